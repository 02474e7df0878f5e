"""Runs an ExecutionPlan in this process: the server's Interpreter over ``plan.graph``, stage by stage.

This is the reference for how a runtime consumes a plan (the remote one does the same across a
wire). Synchronous; call it from a worker thread.

Call tree::

    run_plan(plan, inputs, device=..., wait_input=..., on_output=...)
      _StagedInterpreter(plan.graph).run(inputs)             program order = stage order
        run_node(node)
          first node of stage k   -> stage k's span starts
          genie.input             -> wait_input(position): the upload may still be arriving
          any node                -> Interpreter.run_node; the meter tracks what it allocates
        on_node(node)            (after the value is stored, before dead values are dropped)
          last node of stage k    -> span ends; on_output(i, value) for outputs final now
        (Interpreter drops each value after its last use: peak stays below the sum)
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from genie._profile import record, span
from genie.graph import INPUT, Node
from genie.semantic import ExecutionPlan
from genie.server import Interpreter


@dataclass
class PlanRun:
    outputs: list[torch.Tensor]
    peak_bytes: int  # activation bytes alive at once, measured on the tensors themselves
    activation_bytes: int  # every activation allocated, added up
    stage_times: list[tuple[float, float]] = field(default_factory=list)  # perf_counter (start, end)
    output_times: dict[int, float] = field(default_factory=dict)  # output index -> when handed over


class _Meter:
    """Bytes held by live activation storages, counted once per storage (views share it)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.live: dict[int, list[int]] = {}  # storage ptr -> [nbytes, live tensors]
        self.alive = self.peak = self.total = 0

    def track(self, value: Any) -> None:
        if isinstance(value, (tuple, list)):
            for v in value:
                self.track(v)
            return
        if not isinstance(value, torch.Tensor):
            return
        st = value.untyped_storage()
        ptr, nbytes = st.data_ptr(), st.nbytes()
        if nbytes == 0 or ptr in self.exclude:
            return
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [nbytes, 0]
            self.alive += nbytes
            self.total += nbytes
            self.peak = max(self.peak, self.alive)
        entry[1] += 1
        weakref.finalize(value, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[ptr]
            self.alive -= entry[0]


class _StagedInterpreter(Interpreter):
    def __init__(self, plan: ExecutionPlan, *, device: torch.device, constants: Mapping[str, torch.Tensor],
                 residents: Mapping[int, torch.Tensor], meter: _Meter, run: PlanRun,
                 wait_input: Callable[[int], None] | None,
                 on_output: Callable[[int, torch.Tensor], None] | None) -> None:
        super().__init__(plan.graph, device=device, constants=constants, residents=residents,
                         on_node=self._after_node)
        self.plan, self.meter, self.result = plan, meter, run
        self.wait_input, self.on_output = wait_input, on_output
        self._starts = {s.first: s for s in plan.stages}
        self._ends = {s.last: s for s in plan.stages}
        self._out_nodes = {r.node for r in plan.graph.outputs}
        self._outs: dict[int, Any] = {}
        self._t0 = 0

    def run_node(self, node: Node) -> Any:
        if node.id in self._starts:
            self._t0 = time.perf_counter_ns()
        if node.op == INPUT and self.wait_input is not None:
            with span(f"wait input {node.args[0]}", "wait"):
                self.wait_input(node.args[0])
        value = super().run_node(node)
        if node.op != INPUT:
            self.meter.track(value)
        if node.id in self._out_nodes:
            self._outs[node.id] = value
        return value

    def _after_node(self, node: Node) -> None:
        stage = self._ends.get(node.id)
        if stage is None:
            return
        t1 = time.perf_counter_ns()
        record(f"stage {stage.index} [{stage.name}]", "compute", self._t0, t1,
               args={"nodes": len(stage.nodes), "flops": stage.flops, "fused": len(stage.fused)})
        self.result.stage_times.append((self._t0 / 1e9, t1 / 1e9))
        g = self.plan.graph
        for i in stage.ready_outputs:
            if i in stage.keep_outputs or self.on_output is None:
                continue
            r = g.outputs[i]
            v = self._outs[r.node]
            value = v[r.index] if g.nodes[r.node].multi else v
            with span(f"download output {i}", "download"):
                self.on_output(i, value)
            self.result.output_times[i] = time.perf_counter()


def run_plan(plan: ExecutionPlan, inputs: Sequence[torch.Tensor], *, device: str | torch.device = "cpu",
             constants: Mapping[str, torch.Tensor] | None = None,
             residents: Mapping[int, torch.Tensor] | None = None,
             wait_input: Callable[[int], None] | None = None,
             on_output: Callable[[int, torch.Tensor], None] | None = None) -> PlanRun:
    """Run ``plan.graph`` on ``inputs``; ``wait_input(pos)`` blocks until input ``pos`` has arrived
    (its buffer in ``inputs`` may be filled concurrently), ``on_output(i, value)`` ships output ``i``
    as soon as its stage ends. Returns the outputs, measured peak activation bytes and stage times."""
    device = torch.device(device)
    constants = plan.graph.constants if constants is None else constants
    residents = residents or {}
    exclude = {t.untyped_storage().data_ptr() for t in (*constants.values(), *residents.values(), *inputs)}
    meter = _Meter(exclude)
    result = PlanRun([], 0, 0)
    interp = _StagedInterpreter(plan, device=device, constants=constants, residents=residents, meter=meter,
                                run=result, wait_input=wait_input, on_output=on_output)
    result.outputs = interp.run(inputs)
    del interp
    result.peak_bytes, result.activation_bytes = meter.peak, meter.total
    return result
