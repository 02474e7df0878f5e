"""Run a whole graph by its plan: ``execute`` (CPU tensors back) and ``submit_graph`` (values kept)."""

from __future__ import annotations

import torch

from genie._profile import active as profiling
from genie._profile import record_timeline
from genie.graph import Graph, TensorMeta
from genie.runtime._backend import backend
from genie.semantic import run_scheduler


async def execute(graph: Graph, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Run ``graph`` on the current backend with host ``inputs`` bound in order; returns CPU tensors.
    Awaitable from trio or asyncio (the backend's bridge tells them apart).

    The scheduled plan drives the run: its graph has each matched attention and conv-bn-act group
    as one fused op (Triton on CUDA, the torch reference elsewhere); the server runs it in the
    plan's stages, starting before the plan's streamed (large) inputs have arrived and sending each
    output back as soon as its stage ends. Plans are cached by structure, on both sides.
    """
    graph.check_inputs(inputs)  # the caller's mistake: say so before anything is sent
    host = _on_host(inputs)
    plan = run_scheduler().schedule(graph)
    run = plan.graph
    trace = profiling()
    result = await backend().run_async(run, host, fetch=range(len(run.outputs)), keep=(),
                                       constants=run.constants, stages=plan.stage_schedule(),
                                       stream=plan.stream, trace=trace)
    if trace and result.timeline is not None:
        record_timeline(result.timeline, [f"{s.index} [{s.name}]" for s in plan.stages], "server")
    return result.fetched


def submit_graph(graph: Graph, *inputs: torch.Tensor) -> tuple[list[int], list[TensorMeta]]:
    """Start ``graph`` by its plan and keep every output on the executor: (handles, metas), at once.
    The run is not waited for; a failure surfaces where a handle is read."""
    graph.check_inputs(inputs)
    plan = run_scheduler().schedule(graph)
    run = plan.graph
    handles = backend().submit(run, _on_host(inputs), keep=range(len(run.outputs)), constants=run.constants,
                               stages=plan.stage_schedule(), stream=plan.stream)
    return handles, [run.meta(r) for r in run.outputs]


def _on_host(inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Local device tensors (CUDA here) copied to the host; remote ones were bound as handles."""
    return [t if t.device.type == "cpu" else t.detach().cpu() for t in inputs]
