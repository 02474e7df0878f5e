"""``torch.save`` of remote tensors and state dicts, and ``torch.load`` of them with its defaults
(``weights_only=True``): host tensors by default, remote ones with ``map_location`` naming the
device, as a CUDA checkpoint's tensors come back to CUDA. Against a real ``genie serve``."""

from __future__ import annotations

import io

import _server_fixtures as fx
import torch
from torch import nn

import genie

server, remote = fx.server, fx.remote  # fixtures, by name
DEV = "remote_accelerator:0"


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def loaded(data: bytes, **kw):
    return torch.load(io.BytesIO(data), **kw)  # weights_only=True: torch's default


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)  # an int64 buffer too (num_batches_tracked)
        self.out = nn.Linear(3, 2).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.lin(x)).to(torch.bfloat16))


def same_state(got: dict, want: dict, device: str) -> None:
    assert list(got) == list(want)
    for k, v in got.items():
        assert v.device.type == torch.device(device).type, k
        assert v.dtype == want[k].dtype and v.shape == want[k].shape, k
        assert torch.equal(v.cpu(), want[k]), k


def test_a_remote_state_dict_loads_with_the_defaults_as_host_tensors(remote):
    torch.manual_seed(0)
    ref = Net()
    model = Net()
    model.load_state_dict(ref.state_dict())
    model.to(DEV)
    model.train()(torch.randn(5, 4, device=DEV))  # running stats written on the server
    ref.train()(torch.randn(5, 4))
    data = saved(model.state_dict())
    state = loaded(data)
    assert all(type(v) is torch.Tensor for v in state.values())
    want = {k: v.cpu() for k, v in model.state_dict().items()}
    same_state(state, want, "cpu")
    fresh = Net()
    fresh.load_state_dict(state)
    same_state(fresh.state_dict(), want, "cpu")


def test_map_location_brings_a_checkpoint_onto_the_device(remote):
    torch.manual_seed(0)
    ref = Net()
    for source in (ref, Net().to(DEV)):  # saved from the host, and from the device
        if source is not ref:
            source.load_state_dict(ref.state_dict())
        state = loaded(saved(source.state_dict()), map_location=DEV)
        assert all(isinstance(v, genie.LazyTensor) for v in state.values())
        same_state(state, ref.state_dict(), DEV)
        model = Net().to(DEV)
        model.load_state_dict(state)
        x = torch.randn(2, 4)
        with torch.no_grad():
            torch.testing.assert_close(model.eval().lin(x.to(DEV)).cpu(), ref.eval().lin(x))
    state = loaded(saved(ref.state_dict()), map_location=torch.device(DEV))
    assert all(isinstance(v, genie.LazyTensor) for v in state.values())


def test_parameters_and_views_round_trip_as_torch_keeps_them(remote):
    """A Parameter comes back a Parameter that requires grad; two tensors that shared a storage in
    the file share it on the device (a write through one shows in the other)."""
    w = nn.Parameter(torch.randn(3, 2))
    p = loaded(saved(w.detach().to(DEV).requires_grad_()))
    assert type(p) is torch.Tensor and p.requires_grad and torch.equal(p, w.detach())
    remote_param = nn.Linear(2, 3).to(DEV).weight
    back = loaded(saved(remote_param), map_location=DEV)
    assert isinstance(back, nn.Parameter) and back.requires_grad and isinstance(back, genie.LazyTensor)
    torch.testing.assert_close(back.cpu(), remote_param.cpu())
    base = torch.arange(10.0)
    views = loaded(saved({"a": base[2:5], "b": base[4:]}), map_location=DEV)
    assert views["a"].shape == (3,) and views["b"].shape == (6,)
    views["a"].mul_(10)
    torch.testing.assert_close(views["b"].cpu(), torch.tensor([40.0, 5, 6, 7, 8, 9]))
    torch.testing.assert_close(views["a"].cpu(), torch.tensor([20.0, 30, 40]))
