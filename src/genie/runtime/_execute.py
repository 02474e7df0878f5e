"""``await genie.execute(graph, *inputs)``: run a whole graph, get CPU tensors back."""

from __future__ import annotations

import torch

from genie.graph import Graph
from genie.runtime._backend import backend


async def execute(graph: Graph, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Run ``graph`` on the current backend with ``inputs`` bound in order; returns CPU tensors."""
    graph.check_inputs(inputs)  # the caller's mistake: say so before anything is sent
    result = await backend().run_async(graph, list(inputs), fetch=range(len(graph.outputs)),
                                       keep=(), constants=graph.constants)
    return result.fetched
