"""``await genie.execute(graph, *inputs)``: run a whole graph by its plan, get CPU tensors back."""

from __future__ import annotations

import torch
import trio

from genie._profile import active as profiling
from genie._profile import record_timeline
from genie.graph import Graph
from genie.runtime._backend import backend
from genie.semantic import run_scheduler


async def execute(graph: Graph, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Run ``graph`` on the current backend with ``inputs`` bound in order; returns CPU tensors.

    The scheduled plan drives the run: its graph has each matched attention and conv-bn-act group
    as one fused op (Triton on CUDA, the torch reference elsewhere); the server runs it in the
    plan's stages, starting before the plan's streamed (large) inputs have arrived and sending each
    output back as soon as its stage ends. Plans are cached by digest, on both sides.

    An input on another device (a ``remote_accelerator`` tensor, still lazy or kept remote) is
    brought to the host first, in a worker thread: materializing it is a blocking run of its own.
    """
    graph.check_inputs(inputs)  # the caller's mistake: say so before anything is sent
    host = await _on_host(list(inputs))
    plan = run_scheduler().schedule(graph)
    run = plan.graph
    trace = profiling()
    result = await backend().run_async(run, host, fetch=range(len(run.outputs)), keep=(),
                                       constants=run.constants, stages=plan.stage_schedule(),
                                       stream=plan.stream, trace=trace)
    if trace and result.timeline is not None:
        record_timeline(result.timeline, [f"{s.index} [{s.name}]" for s in plan.stages], "server")
    return result.fetched


async def _on_host(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``inputs`` with every non-CPU tensor copied to the host (plain CPU tensors pass as they are)."""
    away = [i for i, t in enumerate(inputs) if t.device.type != "cpu"]
    if not away:
        return inputs
    values = await trio.to_thread.run_sync(lambda: [inputs[i].detach().cpu() for i in away])
    out = list(inputs)
    for i, v in zip(away, values, strict=True):
        out[i] = v
    return out
