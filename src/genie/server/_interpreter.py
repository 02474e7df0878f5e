"""Runs a Graph on real tensors, in program order, as torch.fx's Interpreter does.

Program order on real tensors makes views, in-place ops and aliasing right by construction: the
interpreter never reorders. Each value is dropped after its last use.

Call tree::

    Interpreter(graph, device=..., constants=..., residents=...).run(inputs)
      check_inputs(inputs)               dtype/shape of each binding against the graph
      begin(inputs); for node in graph.nodes: step(node)
        run_node(node)
          genie.input     -> inputs[position]
          genie.const     -> constants[digest]
          genie.resident  -> residents[handle]
          anything else   -> call_op(node): resolve_op, map device args, seed RNG, call
        free values whose last user has run
      return [values of graph.outputs]
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from genie._errors import RemoteExecutionError, UnsupportedOpError
from genie.graph import CONST, INPUT, RESIDENT, Graph, Node, Ref, map_refs, resolve_op

_FUSED: dict[str, dict[str, Callable]] = {}  # device type -> fused-op table


def fused_ops(device: torch.device) -> dict[str, Callable]:
    """genie.kernels' fused ops: the Triton launcher on CUDA, the torch reference elsewhere."""
    table = _FUSED.get(device.type)
    if table is None:
        from genie.kernels import FUSED_OPS

        table = _FUSED[device.type] = {name: (f.launcher if device.type == "cuda" else f.reference)
                                       for name, f in FUSED_OPS.items()}
    return table


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` alone in a storage that starts at it: as_strided offsets count from the storage start,
    so a value that is a slice of a receive buffer would read its neighbours' bytes."""
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes:
        return t
    return t.clone()


class Interpreter:
    def __init__(
        self,
        graph: Graph,
        *,
        device: torch.device,
        constants: Mapping[str, torch.Tensor],
        residents: Mapping[int, torch.Tensor] | None = None,
        on_node: Callable[[Node], None] | None = None,
    ) -> None:
        self.graph = graph
        self.device = device
        self.constants = constants
        self.residents = residents or {}
        self.on_node = on_node
        self._values: dict[int, Any] = {}
        self._inputs: Sequence[torch.Tensor] = ()

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.check_inputs(inputs)
        self.begin(inputs)
        for node in self.graph.nodes:
            self.step(node)
        return self.results()

    def begin(self, inputs: Sequence[torch.Tensor]) -> None:
        self._inputs = inputs
        self._dead_after = self._last_uses()
        self._keep = {r.node for r in self.graph.outputs}

    def step(self, node: Node) -> None:
        """Run ``node``, then drop the values it was the last reader of."""
        self._values[node.id] = self.run_node(node)
        if self.on_node is not None:
            self.on_node(node)
        for dead in self._dead_after.get(node.id, ()):
            if dead not in self._keep:
                del self._values[dead]

    def results(self) -> list[torch.Tensor]:
        return [self._value(r) for r in self.graph.outputs]

    def check_inputs(self, inputs: Sequence[torch.Tensor]) -> None:
        self.graph.check_inputs(inputs)

    def _last_uses(self) -> dict[int, list[int]]:
        """node id -> values whose last reader it is."""
        last: dict[int, int] = {}
        for n in self.graph.nodes:
            for r in n.refs():
                last[r.node] = n.id
        out: dict[int, list[int]] = {}
        for value, user in last.items():
            out.setdefault(user, []).append(value)
        return out

    def _value(self, r: Ref) -> Any:
        v = self._values[r.node]
        return v[r.index] if self.graph.nodes[r.node].multi else v

    # -- one method per node kind -------------------------------------------------------------
    def run_node(self, node: Node) -> Any:
        if node.op == INPUT:
            return own_storage(self._inputs[node.args[0]].to(self.device))
        if node.op == CONST:
            return self.constants[node.args[0]]
        if node.op == RESIDENT:
            return self.residents[node.args[0]]
        return self.call_op(node)

    def call_op(self, node: Node) -> Any:
        fn = resolve_op(node.op, fused_ops(self.device) if node.op.startswith("genie.") else None)
        args = map_refs(node.args, self._value)
        kwargs = {k: map_refs(v, self._value) for k, v in node.kwargs.items()}
        if "device" in kwargs and kwargs["device"] is not None:
            kwargs["device"] = self._local_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        try:
            if node.seed is None:
                return fn(*args, **kwargs)
            return self._call_seeded(fn, node.seed, args, kwargs)
        except UnsupportedOpError:
            raise
        except Exception as e:
            raise RemoteExecutionError(f"{type(e).__name__}: {e}", op=node.op,
                                       remote_traceback=traceback.format_exc()) from e

    def _local_device(self, d: torch.device | str) -> torch.device:
        d = torch.device(d)
        return d if d.type == "cpu" else self.device

    def _call_seeded(self, fn: Callable, seed: int, args: tuple, kwargs: dict) -> Any:
        schema = getattr(fn, "_schema", None)
        if schema is not None and any(a.name == "generator" for a in schema.arguments):
            kwargs["generator"] = torch.Generator(self.device).manual_seed(seed)
            return fn(*args, **kwargs)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return fn(*args, **kwargs)
