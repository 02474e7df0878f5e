"""Ordinary PyTorch that must come back right over a real server: stride-0 and conjugate outputs,
every factory op on the device, and ``copy.deepcopy`` inside a capture."""

from __future__ import annotations

import copy

import _server_fixtures as fx
import pytest
import torch

import genie
from genie.graph._ops import overload, registry
from genie.lazy._device import FACTORIES, REFUSED_FACTORIES

server, remote = fx.server, fx.remote  # fixtures, by name
DEV = "remote_accelerator:0"


def same(got: torch.Tensor, want: torch.Tensor, exact: bool = True) -> None:
    """Values, dtype and shape of ``got`` (a CPU result) equal eager's ``want``."""
    want = want.resolve_conj().resolve_neg()
    assert got.device.type == "cpu" and got.dtype == want.dtype and got.shape == want.shape
    if exact:
        assert torch.equal(got, want), (got, want)
    else:
        torch.testing.assert_close(got, want)


# -- item 16: stride-0 and conjugate views as outputs -----------------------------------------------
VIEWS = {
    "expand_as": lambda x: x[:, :1].expand_as(x),
    "expand_scalar": lambda x: x.sum().expand(3, 5),
    "ifft": lambda x: torch.fft.ifft(x[0]),
    "ihfft": lambda x: torch.fft.ihfft(x[0]),
    "ihfftn": lambda x: torch.fft.ihfftn(x),
    "conj": lambda x: torch.fft.fft(x[0]).conj(),
    "conj_imag": lambda x: torch.fft.fft(x[0]).conj().imag,
    "conj_then_op": lambda x: torch.fft.ihfft(x[0]) * 2,
    "neg_view": lambda x: torch._neg_view(torch.fft.fft(x[0])),
}


@pytest.mark.parametrize("name", list(VIEWS))
def test_view_outputs_come_back_right(remote, name):
    fn = VIEWS[name]
    x = torch.randn(4, 6)
    same(fn(x.to(DEV)).cpu(), fn(x), exact=False)  # device mode
    graph = genie.trace(fn, x)  # an explicit run, fetched from the server
    (got,) = remote.run(graph, [x], fetch=[0], keep=[], constants=graph.constants).fetched
    same(got, fn(x), exact=False)


def test_kept_stride0_and_conj_values_fetch_right(remote):
    x = torch.randn(4, 6)
    r = x.to(DEV)
    wide, conj = r[:, :1].expand(4, 6), torch.fft.ifft(r[0])
    (r + 1).cpu()  # a run that keeps both on the server as residents
    same(wide.cpu(), x[:, :1].expand(4, 6))
    same(conj.cpu(), torch.fft.ifft(x[0]), exact=False)
    same((wide * 2).cpu(), x[:, :1].expand(4, 6) * 2)


def test_write_through_a_conj_view_is_refused_not_wrong(remote):
    """The server holds conj views as copies: a write that eager would show through one is refused
    (never a silently stale value); a write to a fresh conj result (``ifft``) is fine."""
    c = torch.randn(4, dtype=torch.complex64)
    z = c.to(DEV)
    z.conj().mul_(2)
    with pytest.raises(genie.UnsupportedOpError, match="conjugate"):
        z.cpu()
    w = torch.fft.ifft(c.to(DEV))
    w.mul_(2)
    same(w.cpu(), torch.fft.ifft(c) * 2, exact=False)


def test_cpu_conj_input_travels_as_its_values(remote):
    z = torch.randn(5, dtype=torch.complex64).conj()  # a conj view on the client
    graph = genie.trace(lambda a: a * 1, torch.randn(5, dtype=torch.complex64))
    (got,) = remote.run(graph, [z], fetch=[0], keep=[], constants=graph.constants).fetched
    same(got, z)


# -- item 17: every factory op ---------------------------------------------------------------------
def _aten_factories() -> list[str]:
    """Every aten overload of the installed torch with no tensor argument and a device argument."""
    out = []
    for name, parts in registry().items():
        if parts[0] != "aten":
            continue
        args = overload(parts)._schema.arguments
        if any("Tensor" in str(a.type) for a in args):
            continue
        if any(a.name == "device" for a in args):
            out.append(name)
    return sorted(out)


def _short(name: str) -> str:
    _, packet, ov = name.split(".")
    return packet if ov == "default" else f"{packet}.{ov}"


def test_every_factory_is_covered_by_the_device():
    found = _aten_factories()
    assert "aten.triu_indices.default" in found and len(found) > 40
    special = {"empty.memory_format", "empty_strided"}  # their own kernels in lazy/_device.py
    for name in found:
        short = _short(name)
        assert short in FACTORIES or short in REFUSED_FACTORIES or short in special, \
            f"{name}: a factory the remote device neither implements nor refuses with a reason"
        qualified = f"aten::{short}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "PrivateUse1"), name
    assert all(REFUSED_FACTORIES.values())
    assert not set(FACTORIES) & set(REFUSED_FACTORIES)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("call", [
    lambda: torch.from_file("/etc/hostname", size=4, device=DEV),
    lambda: torch.sparse_coo_tensor((2, 2), device=DEV),
])
def test_refused_factories_say_why(call):
    with pytest.raises(genie.UnsupportedOpError, match="not on remote_accelerator"):
        call()


FACTORY_CASES = {
    "triu_indices": lambda d: torch.triu_indices(4, 5, 1, device=d),
    "tril_indices": lambda d: torch.tril_indices(5, 3, -1, device=d),
    "arange": lambda d: torch.arange(7, device=d),
    "arange.start_step": lambda d: torch.arange(1.0, 4.0, 0.5, device=d),
    "arange.dtype": lambda d: torch.arange(2, 11, 3, dtype=torch.int16, device=d),
    "range": lambda d: torch.range(0, 3, 0.5, device=d),
    "full": lambda d: torch.full((2, 3), 7.5, device=d),
    "full.int": lambda d: torch.full((2,), 3, dtype=torch.int32, device=d),
    "zeros": lambda d: torch.zeros(2, 3, dtype=torch.float16, device=d),
    "ones": lambda d: torch.ones(4, dtype=torch.bool, device=d),
    "eye": lambda d: torch.eye(3, device=d),
    "eye.m": lambda d: torch.eye(2, 4, device=d),
    "linspace": lambda d: torch.linspace(-1, 1, 9, device=d),
    "logspace": lambda d: torch.logspace(0, 2, 5, base=2.0, device=d),
    "scalar_tensor": lambda d: torch.scalar_tensor(2.5, device=d),
    "fftfreq": lambda d: torch.fft.fftfreq(7, 0.5, device=d),
    "rfftfreq": lambda d: torch.fft.rfftfreq(8, device=d),
    "bartlett": lambda d: torch.bartlett_window(9, device=d),
    "blackman": lambda d: torch.blackman_window(9, periodic=False, device=d),
    "hamming": lambda d: torch.hamming_window(8, True, 0.5, 0.4, device=d),
    "hann": lambda d: torch.hann_window(10, device=d),
    "kaiser": lambda d: torch.kaiser_window(8, False, 6.0, device=d),
}


@pytest.mark.filterwarnings("ignore:torch.range is deprecated:UserWarning")
@pytest.mark.parametrize("name", list(FACTORY_CASES))
def test_factory_values_equal_eager(remote, name):
    make = FACTORY_CASES[name]
    same(make(DEV).cpu(), make("cpu"), exact=name not in ("kaiser", "logspace", "blackman"))


def test_empty_factories_have_the_right_shape(remote):
    for t, shape, stride in [(torch.empty(2, 3, device=DEV), (2, 3), (3, 1)),
                             (torch.empty_strided((2, 3), (1, 2), device=DEV), (2, 3), (1, 2)),
                             (torch.empty_permuted((2, 3, 4), (2, 0, 1), device=DEV), (2, 3, 4), None)]:
        assert t.shape == shape and t.cpu().shape == shape
        if stride is not None:
            assert t.stride() == stride


def test_random_factories_repeat_under_a_seed(remote):
    def draw():
        return [torch.randn(3, 4, device=DEV), torch.rand(5, device=DEV),
                torch.randint(3, 9, (50,), device=DEV), torch.randperm(10, device=DEV),
                torch.normal(2.0, 0.5, (4,), device=DEV)]

    torch.manual_seed(11)
    first = [t.cpu() for t in draw()]
    again = [t.cpu() for t in draw()]
    torch.manual_seed(11)
    repeat = [t.cpu() for t in draw()]
    for a, b in zip(first, repeat, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], again[0])
    randn, rand, randint, perm, _ = first
    assert randn.shape == (3, 4) and randn.dtype == torch.float32
    assert ((rand >= 0) & (rand < 1)).all()
    assert randint.dtype == torch.int64 and randint.min() >= 3 and randint.max() < 9
    assert torch.equal(perm.sort().values, torch.arange(10))


def test_a_generator_seeds_the_remote_draw(remote):
    a = torch.randn(4, generator=torch.Generator().manual_seed(5), device=DEV).cpu()
    b = torch.randn(4, generator=torch.Generator().manual_seed(5), device=DEV).cpu()
    c = torch.randn(4, generator=torch.Generator().manual_seed(6), device=DEV).cpu()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_factories_inside_a_capture(remote):
    with genie.capture():
        idx = torch.triu_indices(3, 3)
        win = torch.hann_window(6)
    assert idx.device.type == "remote_accelerator"
    same(idx.cpu(), torch.triu_indices(3, 3))
    same(win.cpu(), torch.hann_window(6))


# -- item 18: copy.deepcopy inside a capture ---------------------------------------------------------
class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x)) * self.scale


def test_deepcopy_inside_a_capture(remote):
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(3, 4)
    want = net(x)
    with genie.capture():
        twin = copy.deepcopy(net)
        a, b = net(x), twin(x)
    assert twin.scale is not net.scale and twin.lin.weight is not net.lin.weight
    assert isinstance(twin.lin.weight, torch.nn.Parameter) and twin.scale.device.type == "cpu"
    assert torch.equal(twin.scale, net.scale) and torch.equal(twin.lin.weight, net.lin.weight)
    same(a.cpu(), want, exact=False)
    same(b.cpu(), want, exact=False)
    twin.scale.mul_(2)  # a real copy: changing it leaves the original alone
    assert torch.equal(net.scale, torch.linspace(0.5, 2.0, 4))


def test_deepcopy_of_a_remote_module_inside_a_capture(remote):
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(3, 4)
    want = net(x)
    on_device = copy.deepcopy(net).to(DEV)
    with genie.capture():
        twin = copy.deepcopy(on_device)
        out = twin(x.to(DEV))
    assert twin.lin.weight.device.type == "remote_accelerator"
    same(out.cpu(), want, exact=False)


def test_an_out_tensor_that_would_be_resized_is_refused_not_left_stale():
    dev = "remote_accelerator:0"
    with pytest.raises(genie.UnsupportedOpError, match="cannot change shape"):
        torch.arange(5, out=torch.empty(0, device=dev))
    with pytest.raises(genie.UnsupportedOpError, match=r"resize its output from \[3\] to \[5\]"):
        torch.add(torch.ones(5, device=dev), 1, out=torch.empty(3, device=dev))
    out = torch.empty(5, device=dev)
    torch.add(torch.ones(5, device=dev), 1, out=out)  # the right shape: written in place
    torch.testing.assert_close(out.cpu(), torch.full((5,), 2.0))
