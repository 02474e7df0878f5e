"""``await genie.execute(graph, *inputs)``: run a whole graph by its plan, get CPU tensors back."""

from __future__ import annotations

import torch

from genie._profile import active as profiling
from genie._profile import record_timeline
from genie.graph import Graph
from genie.runtime._backend import backend
from genie.semantic import schedule


async def execute(graph: Graph, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Run ``graph`` on the current backend with ``inputs`` bound in order; returns CPU tensors.

    The scheduled plan drives the run: its graph has each matched attention and conv-bn-act group
    as one fused op (Triton on CUDA, the torch reference elsewhere); the server runs it in the
    plan's stages, starting before the plan's streamed (large) inputs have arrived and sending each
    output back as soon as its stage ends. Plans are cached by digest, on both sides.
    """
    graph.check_inputs(inputs)  # the caller's mistake: say so before anything is sent
    plan = schedule(graph)
    run = plan.graph
    trace = profiling()
    result = await backend().run_async(run, list(inputs), fetch=range(len(run.outputs)), keep=(),
                                       constants=run.constants, stages=plan.stage_schedule(),
                                       stream=plan.stream, trace=trace)
    if trace and result.timeline is not None:
        record_timeline(result.timeline, [f"{s.index} [{s.name}]" for s in plan.stages], "server")
    return result.fetched
