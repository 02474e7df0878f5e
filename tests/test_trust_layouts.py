"""Values of every layout travel right, both ways: stride-0 (``expand``), transposed, sliced with a
step, size-1 dims with odd strides, and empty ones, compared against eager PyTorch. A stride-0
``[1, 1]`` value once made the server's send fail, which closed the client's connection."""

from __future__ import annotations

import _server_fixtures as fx
import pytest
import torch
import trio

import genie

server, remote = fx.server, fx.remote  # fixtures, by name
DEV = "remote_accelerator:0"

# name -> a function of one [4, 6] tensor that returns a non-dense (or oddly strided) value
LAYOUTS = {
    "scalar_expand_1x1": lambda x: x.sum().expand(1, 1),
    "scalar_expand_1x1x1": lambda x: x.sum().expand(1, 1, 1),
    "scalar_expand_as": lambda x: x.sum().expand_as(x),
    "row_expand": lambda x: x[:1].expand(3, 4, 6),
    "col_expand": lambda x: x[:, :1].expand(4, 6),
    "stride0_in_two_dims": lambda x: x[0, :1].reshape(1, 1, 1).expand(2, 3, 5),
    "size1_odd_stride": lambda x: x.as_strided((1, 4), (7, 1), 2),
    "single_element_strided": lambda x: x.as_strided((1, 1), (0, 5), 3),
    "transpose": lambda x: x.t(),
    "permute": lambda x: x.reshape(2, 2, 6).permute(2, 0, 1),
    "step_slice": lambda x: x[::2, 1::3],
    "transposed_step": lambda x: x.t()[::3],
    "offset_slice": lambda x: x[1:3, 2:5],
    "diagonal": lambda x: x.diagonal(),
    "zero_size": lambda x: x[:0],
    "zero_size_expand": lambda x: x[:0, :1].expand(0, 6),
    "zero_size_transposed": lambda x: x[:, :0].t(),
}


def same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.device.type == "cpu" and got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_non_dense_value_fetches_right_in_device_mode(remote, name):
    fn, x = LAYOUTS[name], torch.randn(4, 6)
    same(fn(x.to(DEV)).cpu(), fn(x))
    check_served_after(remote)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_non_dense_value_fetches_right_from_a_run_and_when_kept(remote, name):
    fn, x = LAYOUTS[name], torch.randn(4, 6)
    graph = genie.trace(fn, x)
    res = remote.run(graph, [x], fetch=[0], keep=[0], constants=graph.constants)
    same(res.fetched[0], fn(x))
    (kept,) = trio.run(remote.fetch_async, res.handles)
    same(kept, fn(x))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_non_dense_input_travels_as_its_values(remote, name):
    fn, x = LAYOUTS[name], torch.randn(4, 6)
    value = fn(x)
    graph = genie.trace(lambda a: a * 2, value.clone())
    (got,) = remote.run(graph, [value], fetch=[0], keep=[], constants=graph.constants).fetched
    same(got, value * 2)


def test_a_randn_scalar_expanded_fetches_and_the_connection_carries_on(remote):
    torch.manual_seed(0)
    r = torch.randn((), device=DEV)
    wide = r.expand(1, 1)
    got = wide.cpu()
    assert got.shape == (1, 1) and torch.equal(got, r.cpu().expand(1, 1))
    same(r.expand_as(torch.zeros(2, 3, device=DEV)).cpu(), r.cpu().expand(2, 3))
    check_served_after(remote)


def check_served_after(remote) -> None:
    fx.check_served(remote)
