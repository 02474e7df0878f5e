"""Ops on remote_accelerator tensors give eager PyTorch's results."""

import pytest
import torch

import genie

DEV = "remote_accelerator:0"


def remote(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEV)


def test_factories_are_lazy_and_carry_metadata():
    x = torch.randn(3, 4, device=DEV)
    assert isinstance(x, genie.LazyTensor)
    assert x.shape == (3, 4) and x.dtype == torch.float32 and x.device.type == "remote_accelerator"
    z = torch.zeros(2, 5, dtype=torch.int64, device=DEV)
    assert z.dtype == torch.int64 and z.cpu().tolist() == [[0] * 5] * 2
    assert torch.arange(7, device=DEV).cpu().tolist() == list(range(7))
    assert torch.full((2,), 3.5, device=DEV).cpu().tolist() == [3.5, 3.5]
    assert torch.device("remote_accelerator:1").index == 1
    with pytest.raises(ValueError, match="invalid device index 1"):  # one server: one device
        torch.ones(2, device="remote_accelerator:1")


@pytest.mark.parametrize("fn", [
    lambda a, b: a + b * 2 - a / (b.abs() + 1),
    lambda a, b: torch.relu(a).exp().log1p() * torch.sigmoid(b),
    lambda a, b: a.sum(), lambda a, b: a.mean(1), lambda a, b: a.amax(0), lambda a, b: a.std(1),
    lambda a, b: a @ b.T, lambda a, b: torch.softmax(a, -1), lambda a, b: a.cumsum(1),
    lambda a, b: a[1:, ::2], lambda a, b: a[:, 1], lambda a, b: a.T.contiguous(),
    lambda a, b: a.reshape(2, 2, 3).permute(2, 0, 1), lambda a, b: a.unsqueeze(0).expand(2, 4, 3),
    lambda a, b: torch.cat([a, b]), lambda a, b: torch.stack([a, b], 1), lambda a, b: a.split(2),
    lambda a, b: torch.where(a > 0, a, b), lambda a, b: a.max(1), lambda a, b: a.topk(2, 1),
    lambda a, b: a.as_strided((2, 2), (1, 3), 1), lambda a, b: a.clamp(-0.5, 0.5),
])
def test_op_matches_eager(fn):
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    want = fn(a, b)
    got = fn(remote(a), remote(b))
    if isinstance(want, torch.Tensor):
        want, got = [want], [got]
    for w, g in zip(want, got, strict=True):
        assert isinstance(g, genie.LazyTensor)
        assert g.shape == w.shape and g.dtype == w.dtype and g.stride() == w.stride()
        torch.testing.assert_close(g.cpu(), w)


def test_type_promotion_int_bool_and_scalars():
    i = torch.arange(6).reshape(2, 3)
    cases = [lambda x: x + 1.5, lambda x: x * True, lambda x: x // 2, lambda x: x % 4,
             lambda x: (x > 2) & (x < 5), lambda x: x.to(torch.float16) * 2, lambda x: ~(x > 1),
             lambda x: x + torch.tensor(2.5), lambda x: x.sum(dtype=torch.float64)]
    for fn in cases:
        want, got = fn(i), fn(remote(i))
        assert got.dtype == want.dtype
        assert torch.equal(got.cpu(), want)


def test_inplace_on_view_is_visible_through_base():
    x = torch.zeros(3, 4, device=DEV)
    x[0].add_(1)
    x[:, 1].mul_(0).add_(5)
    row = x[2]
    row.fill_(7)
    want = torch.zeros(3, 4)
    want[0].add_(1)
    want[:, 1] = 5
    want[2] = 7
    assert torch.equal(x.cpu(), want)
    assert torch.equal(row.cpu(), want[2])


def test_inplace_after_materialize_keeps_aliasing():
    x = torch.ones(2, 3, device=DEV)
    v = x[1]
    assert x.sum().item() == 6
    v.add_(1)  # x and v are now server-resident; the write must reach x
    assert x.cpu().tolist() == [[1, 1, 1], [2, 2, 2]]


def test_materializers():
    x = remote(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
    assert x.sum().item() == 6.0
    assert x.tolist() == [[1.0, -2.0], [3.0, 4.0]]
    assert bool((x > 0).any()) and not bool((x > 10).any())
    assert int(x[1, 1]) == 4 and float(x[0, 0]) == 1.0
    assert "remote_accelerator:0" in repr(x) and "4." in repr(x)
    assert torch.equal(x.to("cpu"), x.cpu())
    with pytest.raises(TypeError, match="remote_accelerator:0 device type tensor to numpy"):
        x.numpy()
    host = torch.empty(2, 2)
    host.copy_(x)
    assert host[1, 0] == 3.0


def test_item_driven_control_flow():
    x = torch.arange(10, dtype=torch.float32, device=DEV)
    total = 0.0
    while x.sum().item() > 5:
        x = x / 2
        total += 1
    assert total == 4  # 45 -> 22.5 -> 11.25 -> 5.625 -> 2.8125


def test_data_dependent_shapes():
    a = torch.tensor([3.0, -1.0, 0.0, 2.0, -5.0])
    x = remote(a)
    assert torch.equal(x[x > 0].cpu(), a[a > 0])
    assert torch.equal(torch.nonzero(x).cpu(), torch.nonzero(a))
    assert torch.equal(torch.masked_select(x, x < 0).cpu(), torch.masked_select(a, a < 0))
    u = torch.unique(remote(torch.tensor([3, 1, 3, 2, 1])))
    assert u.shape == (3,) and u.cpu().tolist() == [1, 2, 3]
    y = x[x > 0] * 10  # carries on lazily after the data-dependent op
    assert isinstance(y, genie.LazyTensor) and y.cpu().tolist() == [30.0, 20.0]


def test_module_to_device_keeps_working():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(5, 4)
    want = net(x)
    net.to(DEV)
    assert all(isinstance(p, genie.LazyTensor) for p in net.parameters())
    assert isinstance(net[0].weight, torch.nn.Parameter) or net[0].weight.requires_grad
    with torch.no_grad():
        got = net(remote(x))
    torch.testing.assert_close(got.cpu(), want.detach(), atol=1e-6, rtol=1e-5)


def test_mixing_cpu_and_remote_is_a_device_error():
    x = torch.randn(3, device=DEV)
    with pytest.raises(RuntimeError, match="same device.*remote_accelerator:0 and cpu"):
        x + torch.randn(3)
    assert (x + torch.tensor(1.0)).shape == (3,)  # 0-dim CPU tensors are fine, as with CUDA


def test_unknown_op_raises_genie_error_naming_it():
    lib = torch.library.Library("genie_test", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CPU")
    x = torch.randn(3, device=DEV)
    with pytest.raises(genie.UnsupportedOpError, match="genie_test::twice"):
        torch.ops.genie_test.twice(x)


def test_shape_errors_surface_at_record_time():
    a, b = torch.randn(2, 3, device=DEV), torch.randn(4, 5, device=DEV)
    with pytest.raises(RuntimeError):
        a @ b


def test_manual_seed_makes_remote_random_repeatable():
    torch.manual_seed(123)
    a = torch.randn(16, device=DEV).cpu()
    b = torch.rand(4, device=DEV).cpu()
    torch.manual_seed(123)
    assert torch.equal(torch.randn(16, device=DEV).cpu(), a)
    assert torch.equal(torch.rand(4, device=DEV).cpu(), b)
    assert not torch.equal(torch.randn(16, device=DEV).cpu(), a)


def test_shape_cache_hits_on_repeat():
    from genie.lazy import SHAPES

    x = torch.randn(7, 3, device=DEV)
    (x * 3 + 1).relu()
    hits = SHAPES.hits
    (x * 3 + 1).relu()
    assert SHAPES.hits >= hits + 3


def test_a_failed_run_is_not_repeated_and_its_values_say_why():
    x = torch.arange(3.0, device=DEV)
    y = x * 3  # pending: it runs, and is lost, with the failing program
    with pytest.raises(genie.RemoteExecutionError, match="out of bounds"):
        x[torch.tensor([5]).to(DEV)].cpu()  # out of range: only the executor can tell
    with pytest.raises(genie.GenieError, match="lost when the program that computed it failed"):
        y * 2
    with pytest.raises(genie.GenieError, match="lost"):
        y.cpu()
    z = torch.arange(3.0, device=DEV)
    assert (z * 2).cpu().tolist() == [0.0, 2.0, 4.0]  # the thread carries on
