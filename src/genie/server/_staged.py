"""Runs a graph stage by stage from its StageSchedule, and says when each thing happened.

This is how an ExecutionPlan's decisions become behaviour on the executor: a streamed input is
waited for only when the first stage that reads it starts, an output is handed over as soon as its
stage ends, and every value is dropped after its last reader (the meter proves it).

Call tree::

    StagedInterpreter(graph, schedule, ..., get_input=, on_output=, meter=).run(inputs)
      for stage k in layout (schedule.check's, or schedule.layout(graph)): sources sit in their
                                                      first reader's stage
        for node in stage k: step(node)
          genie.input     -> get_input(pos): may block until that input has arrived
          anything else   -> Interpreter.run_node; the meter counts what it allocates
          values whose last reader ran are dropped (Interpreter.step)
        timeline.stages[k] = (start, end); on_output(i, value) for outputs final now
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from genie.graph import SOURCE_OPS, Graph, Node, StageSchedule
from genie.server._interpreter import Interpreter, own_storage


@dataclass
class Timeline:
    """What one staged run did when, on ``time.perf_counter_ns()`` of the process that ran it."""

    stages: list[tuple[int, int]] = field(default_factory=list)  # (start, end) per stage
    waits: list[tuple[int, int, int]] = field(default_factory=list)  # (input pos, start, end)
    outputs: dict[int, tuple[int, int]] = field(default_factory=dict)  # output index -> handover span
    peak_bytes: int = -1  # activation bytes alive at once (-1: not metered)
    activation_bytes: int = -1  # every activation allocated, added up

    def to_wire(self) -> dict:
        return {"stages": [list(s) for s in self.stages], "waits": [list(w) for w in self.waits],
                "outputs": [[i, a, b] for i, (a, b) in self.outputs.items()], "peak_bytes": self.peak_bytes,
                "activation_bytes": self.activation_bytes}


class Meter:
    """Bytes held by live activation storages, counted once per storage (views share one)."""

    def __init__(self) -> None:
        self.exclude: set[int] = set()  # storages of inputs, constants, residents: not activations
        self.live: dict[int, list[int]] = {}  # storage ptr -> [nbytes, live tensors]
        self.alive = self.peak = self.total = 0

    def source(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            self.exclude.add(value.untyped_storage().data_ptr())

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


class StagedInterpreter(Interpreter):
    """``get_input(pos)`` binds input ``pos`` (default: ``inputs[pos]``); ``on_output(i, value)`` is
    called right after the stage that makes output ``i`` final, for each ``i`` in ``early``;
    ``layout`` is the stages' node ids when the caller already has them from ``schedule.check``."""

    def __init__(self, graph: Graph, schedule: StageSchedule, *, device: torch.device,
                 constants: Mapping[str, torch.Tensor], residents: Mapping[int, torch.Tensor] | None = None,
                 get_input: Callable[[int], torch.Tensor] | None = None,
                 on_output: Callable[[int, torch.Tensor], None] | None = None,
                 early: Collection[int] = (), meter: bool = False,
                 layout: list[list[int]] | None = None, private: Collection[str] = ()) -> None:
        super().__init__(graph, device=device, constants=constants, residents=residents, private=private)
        self.schedule = schedule
        self.layout = layout if layout is not None else schedule.layout(graph)[1]  # node ids per stage
        self.get_input = get_input
        self.on_output = on_output
        self.early = set(early) if on_output is not None else set()
        self.meter = Meter() if meter else None
        self.timeline = Timeline()

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        g, tl = self.graph, self.timeline
        by_stage: dict[int, list[int]] = {}
        for i, k in enumerate(self.schedule.ready):
            if i in self.early:
                by_stage.setdefault(k, []).append(i)
        self.begin(inputs)
        for k, ids in enumerate(self.layout):
            t0 = time.perf_counter_ns()
            for nid in ids:
                self.step(g.nodes[nid])
            tl.stages.append((t0, time.perf_counter_ns()))
            for i in by_stage.get(k, ()):
                t1 = time.perf_counter_ns()
                self.on_output(i, self._value(g.outputs[i]))  # type: ignore[misc]
                tl.outputs[i] = (t1, time.perf_counter_ns())
        out = self.results()
        if self.meter is not None:
            tl.peak_bytes, tl.activation_bytes = self.meter.peak, self.meter.total
        return out

    def bind_input(self, node: Node) -> torch.Tensor:
        if self.get_input is None:
            return super().bind_input(node)
        pos = node.args[0]
        t0 = time.perf_counter_ns()
        value = self.get_input(pos)
        self.timeline.waits.append((pos, t0, time.perf_counter_ns()))
        return own_storage(value.to(self.device))

    def run_node(self, node: Node) -> Any:
        value = super().run_node(node)
        if self.meter is not None:
            if node.op in SOURCE_OPS:
                self.meter.source(value)
            else:
                self.meter.track(value)
        return value
