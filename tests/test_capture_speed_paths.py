"""The capture hot path's shortcuts keep every result right.

The shape-cache key drops a Python number's value where the schema takes a Tensor or a Scalar
(only its type promotes), keeps every value that can size the output, and the recording fast paths
(views, sizes lists, graph building) give the same graphs and values as before.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import genie
from genie.graph import Node
from genie.lazy import SHAPES

DEV = "remote_accelerator:0"


def _counts(fn, calls) -> tuple[int, int]:
    """(hits, misses) of the shape cache over ``fn(i)`` for each ``i`` in ``calls``."""
    SHAPES.clear()
    for i in calls:
        fn(i)
    return SHAPES.hits, SHAPES.misses


def test_new_int_each_call_hits_the_cache_and_values_stay_right():
    xc = torch.randn(4, 4)
    x = xc.to(DEV)
    assert _counts(lambda i: x + i, range(200)) == (199, 1)
    for i in (3, 17, 199):
        torch.testing.assert_close((x + i).cpu(), xc + i)


@pytest.mark.parametrize("make", [
    lambda x, v: x.clamp(min=v),  # a Scalar kwarg
    lambda x, v: x.mul(v / 7),  # a float where the schema takes a Tensor
    lambda x, v: torch.full_like(x, v),  # a Scalar fill value
    lambda x, v: x.pow(v % 3 + 1),  # Tensor_Scalar
    lambda x, v: torch.where(x > 0, x, v * 1.5),
    lambda x, v: x.add(1, alpha=v),  # alpha is a Scalar too
], ids=["clamp-kw", "mul-float", "full_like", "pow", "where", "alpha"])
def test_scalar_values_hit_and_compute_right(make):
    xc = torch.randn(3, 5)
    x = xc.to(DEV)
    hits, misses = _counts(lambda v: make(x, v), range(1, 31))
    assert misses <= 3 and hits >= 28  # ``where`` also records ``x > 0`` and a scalar_tensor
    for v in (2, 29):
        torch.testing.assert_close(make(x, v).cpu(), make(xc, v))


def test_nan_scalar_hits_the_cache():
    # nan != nan: keyed by value, ``x + nan`` could never hit
    x = torch.randn(3, device=DEV)
    assert _counts(lambda _: x + float("nan"), range(10)) == (9, 1)
    assert torch.isnan((x + float("nan")).cpu()).all()


@pytest.mark.parametrize(("tensor", "scalars"), [
    (torch.tensor([1, 2, 3]), (2, 2.5, True, 1j)),  # int, float, bool, complex: four dtypes
    (torch.tensor([True, False]), (True, 3, 0.5)),
    (torch.tensor([1.0, 2.0], dtype=torch.float16), (1, 1.0, True)),
])
def test_scalar_types_still_decide_the_dtype(tensor, scalars):
    x = tensor.to(DEV)
    for s in scalars * 2:  # the second round hits the cache
        got, want = x + s, tensor + s
        assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close((x + scalars[1]).cpu(), tensor + scalars[1])


# Values that size, shape or type the output: each pair must give different metas, as eager does.
SIZED = {
    "view": lambda x, k: x.view(k, -1),
    "reshape": lambda x, k: x.reshape(-1, k),
    "expand": lambda x, k: x[:1].expand(k, 12),
    "narrow": lambda x, k: x.narrow(1, 0, k),
    "repeat": lambda x, k: x.repeat(k, 1),
    "slice": lambda x, k: x[:, :k],
    "offset": lambda x, k: x[k - 1:, k:],  # a storage offset that moves with k
    "sum-dim": lambda x, k: x.sum(dim=k % 2),
    "keepdim": lambda x, k: x.amax(1, keepdim=bool(k % 2)),
    "transpose": lambda x, k: x.unsqueeze(k % 3).transpose(0, k % 3),
    "to-dtype": lambda x, k: x.to((torch.float16, torch.int32)[k % 2]),
    "new_zeros": lambda x, k: x.new_zeros(k, 2),
    "pad": lambda x, k: F.pad(x, (k, k)),
    "topk": lambda x, k: x.topk(k, dim=1).values,
    "split": lambda x, k: x.split(k, dim=1)[0],
    "cat-dim": lambda x, k: torch.cat([x, x], dim=k % 2),
    "flatten": lambda x, k: x.unsqueeze(0).flatten(k % 2),
}


@pytest.mark.parametrize("name", list(SIZED))
def test_values_that_change_the_meta_stay_in_the_key(name):
    make = SIZED[name]
    xc = torch.randn(4, 12)
    x = xc.to(DEV)
    for k in (2, 3, 4, 2, 3):  # repeats hit the cache: still each its own meta
        got, want = make(x, k), make(xc, k)
        assert (got.shape, got.stride(), got.storage_offset(), got.dtype) == \
            (want.shape, want.stride(), want.storage_offset(), want.dtype), k
    torch.testing.assert_close(make(x, 3).cpu(), make(xc, 3))


def test_the_key_policy_follows_the_schema():
    from genie.lazy._meta import op_info

    aten = torch.ops.aten
    assert op_info(aten.add.Tensor).typed == (True, True, True)  # self, other, alpha: promote only
    assert op_info(aten.clamp.default).typed == (True, True, True)
    assert op_info(aten.view.default).typed == (True, False)  # the size list is a value
    assert op_info(aten.narrow.default).typed == (True, False, False, False)
    assert op_info(aten.sum.dim_IntList).typed == (True, False, False, False)
    assert not any(op_info(aten.arange.start_step).typed)  # arange's Scalars are its size
    assert not any(op_info(aten.arange.start_out).typed)
    assert "alpha" in op_info(aten.add.Tensor).typed_kw
    assert op_info(aten.view.default).view_of_self and not op_info(aten.add_.Tensor).view_of_self


@pytest.mark.parametrize("n", [3, 5, 3, 8])
def test_arange_into_an_out_tensor_computes_its_values(n):
    got = torch.arange(n, out=torch.empty(n, device=DEV))
    assert got.shape == (n,)
    torch.testing.assert_close(got.cpu(), torch.arange(n, dtype=torch.float32))
    got = torch.arange(0, n * 0.5, 0.5, out=torch.empty(n, device=DEV))
    torch.testing.assert_close(got.cpu(), torch.arange(0, n * 0.5, 0.5))


def test_capture_mode_scalars_hit_and_arange_sizes_stay():
    def fn(x, i):
        return x * i + torch.arange(i + 1, dtype=torch.float32)[-1]

    xc = torch.randn(5)
    SHAPES.clear()
    for i in range(2, 6):
        with genie.capture():
            out = fn(xc, i)
        assert out.shape == (5,)
        torch.testing.assert_close(out.cpu(), fn(xc, i))
    # ``x * i`` hits from the second capture on (``+ t[-1]`` misses: the select's offset moves)
    assert SHAPES.hits >= 3


def test_views_share_storage_through_the_fast_path():
    xc = torch.randn(3, 4)
    x = xc.to(DEV)
    x.transpose(0, 1)[1].mul_(10)  # a view of a view, written in place
    x.view(12)[0:2].zero_()
    xc.transpose(0, 1)[1].mul_(10)
    xc.view(12)[0:2].zero_()
    torch.testing.assert_close(x.cpu(), xc)


def test_mixing_devices_still_raises_on_the_fast_path():
    x = torch.randn(3, device=DEV)
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.randn(3)


def test_sizes_lists_with_tensors_inside_are_converted():
    # a list holding tensors (cat, index) leaves the int-only shortcut for the general path
    xc = torch.randn(4, 3)
    x = xc.to(DEV)
    idx = torch.tensor([2, 0])
    got = torch.cat([x[idx.to(DEV)], x[:1]], dim=0)
    torch.testing.assert_close(got.cpu(), torch.cat([xc[idx], xc[:1]], dim=0))


def test_node_replace_copies_every_field_and_refuses_unknown_ones():
    n = Node(3, "aten.add.Tensor", (1,), {"alpha": 2}, (), True, (4,), (4,), "blk", 7)
    m = n.replace(id=0, args=(2,))
    assert (m.id, m.args, m.kwargs, m.multi, m.storages, m.writes, m.module, m.seed) == \
        (0, (2,), {"alpha": 2}, True, (4,), (4,), "blk", 7)
    assert n.id == 3 and n.args == (1,)
    with pytest.raises(TypeError, match="no field 'bogus'"):
        n.replace(bogus=1)


def test_traced_graph_runs_the_same_after_the_fast_copies():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)).eval()

    def fn(x):
        return model(x).transpose(0, 1).reshape(-1) * 3 + 1

    graph = genie.trace(fn, torch.randn(2, 8))
    assert [n.id for n in graph.nodes] == list(range(len(graph.nodes)))
    gm = graph.to_fx()
    other = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(other), fn(other))


def test_factory_metas_are_cached_by_size_and_fill_type():
    SHAPES.clear()
    for k in (2, 3, 2, 3):
        assert torch.zeros(k, 4, device=DEV).shape == (k, 4)
        assert torch.arange(k, device=DEV).shape == (k,)  # arange's end is its size
    assert SHAPES.misses == 4 and SHAPES.hits == 4
    assert torch.full((2,), 1, device=DEV).dtype == torch.int64
    assert torch.full((2,), 1.0, device=DEV).dtype == torch.float32
    assert torch.full((2,), True, device=DEV).dtype == torch.bool
    SHAPES.clear()
    for v in range(10):
        got = torch.full((3,), v + 0.5, device=DEV)
    assert SHAPES.hits == 9  # the fill value only promotes
    torch.testing.assert_close(got.cpu(), torch.full((3,), 9.5))


def test_the_default_dtype_is_part_of_the_key():
    xi = torch.tensor([1, 2, 3]).to(DEV)
    before = torch.get_default_dtype()
    assert (xi + 1.5).dtype == (xi / 2).dtype == torch.zeros(2, device=DEV).dtype == before
    torch.set_default_dtype(torch.float64)
    try:  # the same calls now hit nothing cached under float32
        assert (xi + 1.5).dtype == (xi / 2).dtype == torch.float64
        assert torch.zeros(2, device=DEV).dtype == torch.arange(3.0, device=DEV).dtype == torch.float64
        torch.testing.assert_close((xi + 1.5).cpu(), torch.tensor([2.5, 3.5, 4.5], dtype=torch.float64))
    finally:
        torch.set_default_dtype(before)
    assert (xi + 1.5).dtype == torch.zeros(2, device=DEV).dtype == before
