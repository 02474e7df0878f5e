"""Runs an ExecutionPlan in this process, by the executor's one path (``server.run_graph``).

The reference for how an executor consumes a plan, without a wire (``genie serve`` runs the same
path, fed by the network). Synchronous; call it from a worker thread.

Call tree::

    run_plan(plan, inputs, device=..., wait_input=..., on_output=...)
      server.run_graph(plan.graph, schedule=plan.stage_schedule(), meter=True)
        private_constants(...)   constants the program writes: its own copies, never the caller's
        StagedInterpreter.run(inputs)
          get_input(pos)      -> wait_input(pos), then inputs[pos]: the upload may still be arriving
          on_output(i, value) -> right after the stage that makes output i final (KV cache kept)
      record_timeline(...)  -> genie.profile() spans: stages, waits, downloads
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from genie._profile import record_timeline
from genie.semantic import ExecutionPlan
from genie.server import run_graph


@dataclass
class PlanRun:
    outputs: list[torch.Tensor]
    peak_bytes: int  # activation bytes alive at once, measured on the tensors themselves
    activation_bytes: int  # every activation allocated, added up
    stage_times: list[tuple[float, float]] = field(default_factory=list)  # perf_counter (start, end)
    output_times: dict[int, float] = field(default_factory=dict)  # output index -> when handed over


def run_plan(plan: ExecutionPlan, inputs: Sequence[torch.Tensor], *, device: str | torch.device = "cpu",
             constants: Mapping[str, torch.Tensor] | None = None,
             residents: Mapping[int, torch.Tensor] | None = None,
             wait_input: Callable[[int], None] | None = None,
             on_output: Callable[[int, torch.Tensor], None] | None = None) -> PlanRun:
    """Run ``plan.graph`` on ``inputs``; ``wait_input(pos)`` blocks until input ``pos`` has arrived
    (its buffer in ``inputs`` may be filled concurrently), ``on_output(i, value)`` ships output ``i``
    as soon as its stage ends. Returns the outputs, measured peak activation bytes and stage times."""
    plan.graph.check_inputs(inputs)

    def get_input(pos: int) -> torch.Tensor:
        if wait_input is not None:
            wait_input(pos)
        return inputs[pos]

    kept = {i for s in plan.stages for i in s.keep_outputs}
    outputs, tl = run_graph(
        plan.graph, inputs, device=torch.device(device),
        constants=plan.graph.constants if constants is None else constants, residents=residents,
        schedule=plan.stage_schedule(), get_input=get_input, on_output=on_output,
        early=[i for i in range(len(plan.graph.outputs)) if i not in kept], meter=True)
    assert tl is not None  # a staged run always has one
    record_timeline(tl.to_wire(), [f"{s.index} [{s.name}]" for s in plan.stages], "client")
    return PlanRun(outputs, tl.peak_bytes, tl.activation_bytes, [(a / 1e9, b / 1e9) for a, b in tl.stages],
                   {i: t / 1e9 for i, (_, t) in tl.outputs.items()})
