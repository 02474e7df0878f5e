"""``genie.capture()`` mistakes get a clear error at the moment the graph is asked for (issue 18):
a capture whose result was not bound has no output, and ``get_graph`` says so, instead of an empty
graph that fails later with "graph takes 0 inputs, got 1"."""

from __future__ import annotations

import _server_fixtures as fx
import pytest
import torch
from torch import nn

import genie

server, remote = fx.server, fx.remote  # fixtures, by name


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU()).eval()


def test_an_unbound_capture_result_is_named_when_the_graph_is_asked_for():
    model, x = _model(), torch.randn(2, 16)
    with genie.capture():
        model(x)  # not bound: gone before the block ends
    with pytest.raises(RuntimeError, match=r"recorded [1-9]\d* op\(s\) but has no output.*Bind the result"):
        genie.get_graph()


def test_an_empty_capture_has_no_graph():
    with genie.capture():
        pass
    with pytest.raises(RuntimeError, match="recorded 0 op"):
        genie.get_graph()


async def test_a_bound_capture_result_runs_and_equals_eager(remote):
    model, example = _model(), torch.randn(2, 16)  # made outside: an input (inside, it would be a node)
    with genie.capture():
        out = model(example)
    graph = genie.get_graph()
    del out
    x = torch.randn(2, 16)
    (got,) = await genie.execute(graph, x)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x))
