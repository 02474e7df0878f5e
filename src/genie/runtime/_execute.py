"""Graphs by their plans: ``execute_graph`` (CPU tensors back), ``submit_graph`` (values kept), and
``planned_for_flush`` (what device mode's flush runs). The recorder hands its graphs here; this is
where they meet the scheduler."""

from __future__ import annotations

import torch

from genie._profile import active as profiling
from genie._profile import record_timeline
from genie.graph import Graph, TensorMeta
from genie.runtime._backend import backend
from genie.semantic import run_scheduler


async def execute_graph(graph: Graph, *inputs: torch.Tensor) -> list[torch.Tensor]:
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


def planned_for_flush(graph: Graph) -> tuple[Graph, dict]:
    """What a flush runs: the scheduled plan of ``graph`` (fused attention and conv-bn-act, stages,
    streamed inputs), from the structure-keyed plan cache, so a decode step whose sizes grew reuses
    the last step's plan without analysis. A plan that changes nothing runs ``graph`` as it is,
    unstaged: a tiny op's round trip pays no staging. So does a flush for an op whose output shape
    depends on data (its metadata is learnt from this run; nothing can be planned around it)."""
    if any(not graph.nodes[r.node].outputs for r in graph.outputs):
        return graph, {}
    plan = run_scheduler().schedule(graph)
    if not plan.fusion_groups and len(plan.stages) <= 1 and not plan.stream:
        return graph, {}
    return plan.graph, {"stages": plan.stage_schedule(), "stream": plan.stream}


def _on_host(inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Local device tensors (CUDA here) copied to the host; remote ones were bound as handles."""
    return [t if t.device.type == "cpu" else t.detach().cpu() for t in inputs]
