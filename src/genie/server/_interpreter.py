"""Runs a Graph on real tensors, in program order, as torch.fx's Interpreter does.

Program order on real tensors makes views, in-place ops and aliasing right by construction: the
interpreter never reorders. Each value is dropped after its last use.

Call tree::

    Interpreter(graph, device=..., constants=..., residents=...)
      resolve every op of the graph       UnsupportedOpError here, before any node runs
    .run(inputs)
      graph.check_inputs(inputs)         dtype/shape of each binding against the graph
      begin(inputs); for node in graph.nodes: step(node)
        run_node(node)                   one method per node kind:
          genie.input     -> bind_input(node):    inputs[position], on the device, in its own storage
          genie.const     -> bind_constant(node): constants[digest]
          genie.resident  -> bind_resident(node): residents[handle]
          anything else   -> call_op(node): map device args; call, through guards.call for an op
                             that needs one (indices in bounds, enum arguments, no write into a
                             shared constant's memory, random ops from the run's own seed, fresh
                             memory zeroed); conj/neg views resolved to copies (later writes to
                             their memory refused)
        free values whose last user has run
      return [values of graph.outputs]
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch

from genie._errors import RemoteExecutionError, RemoteMemoryError, UnsupportedOpError
from genie.graph import CONST, INPUT, RESIDENT, SOURCE_OPS, Graph, Node, Ref, map_refs, resolve_op
from genie.server._guards import Guards, guard_tables
from genie.server._memory import check_output

_FUSED: dict[str, dict[str, Callable]] = {}  # device type -> fused-op table


def fused_ops(device: torch.device) -> dict[str, Callable]:
    """genie.kernels' fused ops: the Triton launcher on CUDA, the torch reference elsewhere."""
    table = _FUSED.get(device.type)
    if table is None:
        from genie.kernels import FUSED_OPS

        table = _FUSED[device.type] = {name: (f.launcher if device.type == "cuda" else f.reference)
                                       for name, f in FUSED_OPS.items()}
    return table


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that failed: torch's CPU allocator (a capped data segment),
    CUDA's, or Python's own."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` alone in a storage that starts at it: as_strided offsets count from the storage start,
    so a value that is a slice of a receive buffer would read its neighbours' bytes."""
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes:
        return t
    return t.clone()


def _plain(out: Any) -> Any:
    """``out`` with conjugate and negative views resolved. The client's metadata has no conj or neg
    bit, so its later ops (``view_as_real`` under ``.imag``) expect the values in plain form."""
    if isinstance(out, torch.Tensor):
        if out.is_conj():
            out = out.resolve_conj()
        return out.resolve_neg() if out.is_neg() else out
    if isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) and (o.is_conj() or o.is_neg())
                                              for o in out):
        return type(out)(_plain(o) for o in out)
    return out


def _returns_views(fn: Callable) -> bool:
    schema = getattr(fn, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


_SEQUENCES = (list, tuple)


@functools.cache
def _device_by_position(fn: Callable) -> bool:
    """Whether ``fn`` takes a device as a positional argument (``aten.to.device``, ``device_put``)."""
    schema = getattr(fn, "_schema", None)
    return schema is not None and any(not a.kwarg_only and "Device" in str(a.type) for a in schema.arguments)


class Interpreter:
    def __init__(
        self,
        graph: Graph,
        *,
        device: torch.device,
        constants: Mapping[str, torch.Tensor],
        residents: Mapping[int, torch.Tensor] | None = None,
        on_node: Callable[[Node], None] | None = None,
        private: Collection[str] = (),
    ) -> None:
        """``private``: keys of ``constants`` that are this run's own copies; every other constant
        is shared (the server's pool, or the caller's tensors), and no node may write its memory."""
        self.graph = graph
        self.device = device
        self.constants = constants
        self.residents = residents or {}
        self.on_node = on_node
        self._values: dict[int, Any] = {}
        self._inputs: Sequence[torch.Tensor] = ()
        self._copied: set[int] = set()  # storages of conj/neg views resolved to copies
        # names were checked when the graph was decoded; fused names resolve only here
        self._fns: dict[str, Callable] = {}
        for op in {n.op for n in graph.nodes if n.op not in SOURCE_OPS}:
            self._fns[op] = resolve_op(op, fused_ops(device) if op.startswith("genie.") else None)
        self._device_args = {op for op, fn in self._fns.items() if _device_by_position(fn)}
        self._private = private
        self.guards = Guards(guard_tables(graph), device)
        self.conformed: set[int] | None = None  # set it to learn which nodes' outputs were laid out again
        self._kinds: dict[str, Callable[[Node], Any]] = {
            INPUT: self.bind_input, CONST: self.bind_constant, RESIDENT: self.bind_resident}

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.graph.check_inputs(inputs)
        self.begin(inputs)
        for node in self.graph.nodes:
            self.step(node)
        return self.results()

    def begin(self, inputs: Sequence[torch.Tensor]) -> None:
        self._inputs = inputs
        self._dead_after = self.graph.dead_after()
        self._keep = {r.node for r in self.graph.outputs}

    def step(self, node: Node) -> None:
        """Run ``node``, then drop the values it was the last reader of."""
        # the client's metadata sized this run: hold the value to it (laid out as declared)
        raw = self.run_node(node)
        value = self._values[node.id] = check_output(node, raw)
        if value is not raw and self.conformed is not None:
            self.conformed.add(node.id)
        if self.on_node is not None:
            self.on_node(node)
        for dead in self._dead_after.get(node.id, ()):
            if dead not in self._keep:
                del self._values[dead]

    def results(self) -> list[torch.Tensor]:
        return [self._value(r) for r in self.graph.outputs]

    def _value(self, r: Ref) -> Any:
        v = self._values[r.node]
        return v[r.index] if self.graph.nodes[r.node].multi else v

    # -- one method per node kind -------------------------------------------------------------
    def run_node(self, node: Node) -> Any:
        kind = self._kinds.get(node.op)
        return self.call_op(node) if kind is None else kind(node)

    def bind_input(self, node: Node) -> torch.Tensor:
        return own_storage(self._inputs[node.args[0]].to(self.device))

    def bind_constant(self, node: Node) -> torch.Tensor:
        t = self.constants[node.args[0]]
        if node.args[0] not in self._private:
            self.guards.protect(t)
        return t

    def bind_resident(self, node: Node) -> torch.Tensor:
        return self.residents[node.args[0]]

    def call_op(self, node: Node) -> Any:
        fn = self._fns[node.op]
        value = self._value
        # one pass over the arguments (most are Refs or plain values; a list may hold Refs)
        args = [value(a) if type(a) is Ref else map_refs(a, value) if type(a) in _SEQUENCES else a
                for a in node.args]
        kwargs = {k: map_refs(v, value) for k, v in node.kwargs.items()} if node.kwargs else {}
        if node.op in self._device_args:  # aten.to.device, prims.device_put: a device by position
            args = [self._local_device(a) if type(a) is torch.device else a for a in args]
        if kwargs:
            if kwargs.get("device") is not None:
                kwargs["device"] = self._local_device(kwargs["device"])
            kwargs.pop("pin_memory", None)
        if self._copied and not self._copied.isdisjoint(node.writes):
            raise UnsupportedOpError(node.op, "it writes memory that a conjugate or negative view also "
                                     "holds; such views run as copies, so the write would not show")
        guards = self.guards
        try:  # most ops need no guard: one set lookup
            out = guards.call(node, fn, args, kwargs) if node.op in guards.special else fn(*args, **kwargs)
        except UnsupportedOpError:
            raise
        except Exception as e:
            if out_of_memory(e):  # past the worker's allocator cap (``_workers.cap_memory``)
                raise RemoteMemoryError(f"{node.op} could not allocate its memory: {e}") from e
            raise RemoteExecutionError(f"{type(e).__name__}: {e}", op=node.op,
                                       remote_traceback=traceback.format_exc()) from e
        plain = _plain(out)
        if plain is not out and _returns_views(fn):  # x.conj(): a copy of x's memory from here on
            self._copied.update(node.storages)
        return plain

    def _local_device(self, d: torch.device | str) -> torch.device:
        d = torch.device(d)
        return d if d.type == "cpu" else self.device
