"""``await genie.execute(graph, *inputs)``: run a whole graph, get CPU tensors back."""

from __future__ import annotations

import torch

from genie.graph import Graph
from genie.runtime._backend import backend
from genie.semantic import schedule


async def execute(graph: Graph, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Run ``graph`` on the current backend with ``inputs`` bound in order; returns CPU tensors.

    What runs is the scheduled plan's graph: matched attention and conv-bn-act groups are one
    fused op each (Triton on CUDA, the torch reference elsewhere). Plans are cached by digest.
    """
    graph.check_inputs(inputs)  # the caller's mistake: say so before anything is sent
    plan = schedule(graph)
    run = plan.graph
    result = await backend().run_async(run, list(inputs), fetch=range(len(run.outputs)),
                                       keep=(), constants=run.constants)
    return result.fetched
