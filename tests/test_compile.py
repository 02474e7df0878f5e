"""genie.compile on plain functions and small modules, against a real ``genie serve``: replays record
nothing and send one small frame; every guard that fails records again and stays right."""

from __future__ import annotations

import _server_fixtures as fx
import torch
from torch import nn

import genie
from genie.lazy._lazy import current_recorder

server, remote, any_backend = fx.server, fx.remote, fx.any_backend  # fixtures, by name
DEV = "remote_accelerator:0"


def _ops() -> int:
    s = genie.stats()
    return s["shape_cache_hits"] + s["shape_cache_misses"]  # one look-up per recorded op


class Counter(nn.Module):
    """A linear layer that also counts its calls in a buffer, in place."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> dict:
        self.calls.add_(1)
        return {"y": torch.relu(self.lin(x)), "x": x}


@torch.no_grad()
def test_replay_records_nothing_and_sends_one_small_frame(remote):
    net, ref = Counter().to(DEV), Counter()
    net.forward = genie.compile(net.forward)
    for i in range(6):
        x = torch.randn(2, 8)
        xd = x.to(DEV)
        remote.synchronize()  # the last call's replay is answered: its reply counts before, not in, this one
        before, ops = genie.stats(), _ops()
        out = net(xd)
        remote.synchronize()  # the replay's reply, counted whenever it lands (maybe before the call returns)
        after = genie.stats()
        if i >= 2:  # 0 records, 1 rebinds the written buffer (a new identity) and records, 2+ replay
            assert _ops() == ops
            assert not current_recorder().pending
            assert after["bytes_sent"] - before["bytes_sent"] <= 4096
            # one frame and its one reply: the call waited for nothing else
            assert after["round_trips"] - before["round_trips"] == 1
        assert type(out) is dict and out["x"] is xd
        assert isinstance(out["y"], genie.LazyTensor)
        torch.testing.assert_close(out["y"].cpu(), ref(x)["y"])
        if i >= 2:  # the replay, then the .cpu() run; no other
            assert genie.stats()["runs"] - before["runs"] == 2
    assert net.forward.replays == 4
    assert int(net.calls.cpu()) == 6  # the in-place write ran on the server at every call


@torch.no_grad()
def test_failed_guard_shape_change_records_again(any_backend):
    w = torch.randn(8, 8)
    wd = w.to(DEV)
    f = genie.compile(lambda x, k: (x @ wd + k, x.sum()))
    for rows in (2, 2, 3, 3, 2):
        for k in (1.0, 2.0):
            x = torch.randn(rows, 8)
            y, s = f(x.to(DEV), k)
            torch.testing.assert_close(y.cpu(), x @ w + k)
            torch.testing.assert_close(s.cpu(), x.sum())
    assert f.records == 4  # (2 rows, 3 rows) x (k=1, k=2): the scalar is guarded too
    assert f.replays == 6


@torch.no_grad()
def test_reassigned_parameter_records_again(remote):
    torch.manual_seed(0)
    net = nn.Linear(8, 4).to(DEV)
    net.forward = genie.compile(net.forward)
    x = torch.randn(3, 8)
    first = net(x.to(DEV)).cpu()
    net(x.to(DEV)).cpu()
    assert net.forward.replays == 1
    w = torch.randn(4, 8)
    net.weight = nn.Parameter(w.to(DEV))
    got = net(x.to(DEV)).cpu()
    torch.testing.assert_close(got, x @ w.T + net.bias.cpu())
    assert not torch.allclose(got, first)
    assert net.forward.records == 2


@torch.no_grad()
def test_weights_written_straight_into_module_dicts_record_again(remote):
    """``_apply`` and ``load_state_dict(assign=True)`` write ``_parameters``/``_buffers`` directly, and
    a submodule can be swapped: the kept module tree notices each (no hook would)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).to(DEV)
    net.forward = genie.compile(net.forward)
    x = torch.randn(3, 8)
    for _ in range(2):
        net(x.to(DEV)).cpu()
    assert net.forward.replays == 1
    w = torch.randn(8, 8)
    net[0]._parameters["weight"] = nn.Parameter(w.to(DEV))  # what _apply does
    torch.testing.assert_close(net(x.to(DEV)).cpu(), torch.relu(x @ w.T + net[0].bias.cpu()))
    assert net.forward.records == 2
    net[1] = nn.Tanh()  # a submodule swapped
    torch.testing.assert_close(net(x.to(DEV)).cpu(), torch.tanh(x @ w.T + net[0].bias.cpu()))
    assert net.forward.records == 3
    net[0].register_buffer("scale", torch.ones(8).to(DEV))  # an entry added (unused by forward)
    net(x.to(DEV)).cpu()
    assert net.forward.records == 4


@torch.no_grad()
def test_training_flip_records_again(remote):
    """Dropout and batch norm change behaviour with ``train()``: each mode has its own recording."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
    net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
    net.load_state_dict(ref.state_dict())
    net = net.to(DEV)
    net.forward = genie.compile(net.forward)
    x = torch.randn(16, 8)
    ref.eval()
    net.eval()
    torch.testing.assert_close(net(x.to(DEV)).cpu(), ref(x))
    net.train()
    ref.train()
    y = net(x.to(DEV)).cpu()
    ref(x)  # the same running-stats update on the reference
    assert (y == 0).any()  # dropout ran: training mode was recorded, not the eval replay
    torch.testing.assert_close(net[1].running_mean.cpu(), ref[1].running_mean)
    net.eval()
    ref.eval()
    torch.testing.assert_close(net(x.to(DEV)).cpu(), ref(x))  # the updated stats are read
    assert net.forward.records == 3


@torch.no_grad()
def test_inputs_pending_constant_and_host(remote):
    """A pending input runs first; a token made with ``torch.tensor(..).to(dev)`` and a host tensor
    copied inside the function travel by their bytes on replay."""
    emb = torch.randn(16, 4)
    embd = emb.to(DEV)

    def f(ids: torch.Tensor, scale_cpu: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, embd) * scale_cpu.to(DEV)

    g = genie.compile(f)
    for tok in (3, 5, 7, 9):
        ids = torch.tensor([[tok]]).to(DEV)
        pending = ids + 1  # recorded, not run yet
        scale = torch.full((1, 4), float(tok))
        got = g(pending, scale).cpu()
        torch.testing.assert_close(got, emb[torch.tensor([[tok + 1]])] * scale)
    assert g.replays == 3


@torch.no_grad()
def test_step_that_syncs_runs_as_device_mode(remote):
    """A function that reads a value on the host inside (``.item()``) is never replayed."""
    f = genie.compile(lambda x: x * 2 if float(x.sum()) > 0 else x * 3)
    for sign in (1, -1, 1, -1):
        x = torch.full((4,), float(sign))
        torch.testing.assert_close(f(x.to(DEV)).cpu(), x * (2 if sign > 0 else 3))
    assert f.replays == 0


def test_capture_records_through_compile():
    f = genie.compile(lambda x: torch.relu(x) + 1)
    with genie.capture():
        y = f(torch.randn(2, 3))
    graph = genie.get_graph()
    assert [n.op for n in graph.nodes if n.op in ("aten.relu.default", "aten.add.Tensor")] == [
        "aten.relu.default", "aten.add.Tensor"]
    assert isinstance(y, genie.LazyTensor)


@torch.no_grad()
def test_decorated_method(remote):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        @genie.compile
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * 2

    torch.manual_seed(0)
    a, b = Net().to(DEV), Net().to(DEV)
    x = torch.randn(2, 4)
    for net in (a, b, a, b):
        want = (x @ net.lin.weight.cpu().T + net.lin.bias.cpu()) * 2
        torch.testing.assert_close(net(x.to(DEV)).cpu(), want)
    assert Net.forward.records == 2 and Net.forward.replays == 2  # one recording per module


def test_signature_and_name_are_kept():
    import inspect

    def step(input_ids: torch.Tensor, *, cache: object = None) -> torch.Tensor:
        """docs"""
        return input_ids

    c = genie.compile(step)
    assert inspect.signature(c) == inspect.signature(step)
    assert c.__name__ == "step" and c.__doc__ == "docs"


@torch.no_grad()
def test_cache_is_bounded(remote):
    f = genie.compile(lambda x: x + 1)
    for rows in [r for r in range(1, 11) for _ in range(2)]:
        torch.testing.assert_close(f(torch.ones(rows, 2).to(DEV)).cpu(), torch.full((rows, 2), 2.0))
    assert len(f.entries) == 8
    assert f.replays == 10


@torch.no_grad()
def test_shapes_that_never_repeat_run_as_device_mode(remote):
    """A growing input (a DynamicCache's keys) misses every time: after a few misses the call stops
    paying for a recording's flush and runs as plain device mode, still right."""
    f = genie.compile(lambda x: x * 2)
    for rows in range(1, 8):
        x = torch.randn(rows, 2)
        before = genie.stats()["round_trips"]
        y = f(x.to(DEV))
        if rows > 4:
            assert genie.stats()["round_trips"] == before  # nothing ran: y is still pending
        torch.testing.assert_close(y.cpu(), x * 2)
    assert f.records == 3 and f.replays == 0


@torch.no_grad()
def test_random_ops_draw_new_seeds_like_device_mode(remote):
    """A replayed dropout gets a fresh seed per call, the same ones device mode would draw."""
    x = torch.ones(64)
    drop = lambda t: nn.functional.dropout(t, 0.5, training=True)  # noqa: E731
    f = genie.compile(drop)
    torch.manual_seed(3)
    got = [f(x.to(DEV)).cpu() for _ in range(4)]
    torch.manual_seed(3)
    want = [drop(x.to(DEV)).cpu() for _ in range(4)]
    assert f.replays == 3
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(got[2], got[3])


@torch.no_grad()
def test_new_python_object_output_is_not_replayed(remote):
    import types

    f = genie.compile(lambda x: types.SimpleNamespace(y=x + 1))
    for v in (1.0, 2.0, 3.0):
        out = f(torch.full((2,), v).to(DEV))
        torch.testing.assert_close(out.y.cpu(), torch.full((2,), v + 1))
    assert f.replays == 0


@torch.no_grad()
def test_shapes_that_settle_are_replayed_again(remote):
    """Prompts of many lengths (a server's prefills) first, then a step of one shape: after at most
    eight calls it records again and replays from then on."""
    f = genie.compile(lambda x: x.sum(0) * 2)
    for rows in (3, 5, 7, 9):
        f(torch.ones(rows, 2).to(DEV)).cpu()
    for _ in range(12):
        torch.testing.assert_close(f(torch.ones(1, 2).to(DEV)).cpu(), torch.full((2,), 2.0))
    assert f.replays >= 12 - 8


@torch.no_grad()
def test_scalar_inside_an_argument_object_is_guarded(remote):
    class Opts:
        def __init__(self, scale: float) -> None:
            self.scale = scale

    f = genie.compile(lambda x, o: x * o.scale)
    x = torch.ones(3)
    o = Opts(2.0)
    for scale in (2.0, 2.0, 3.0, 3.0):
        o.scale = scale
        torch.testing.assert_close(f(x.to(DEV), o).cpu(), x * scale)
    assert f.records == 2 and f.replays == 2


def _attend(q, k, v, pad):
    n = q.shape[-2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal[None, None]
                                                            & pad[:, None, None, :].bool())


@torch.no_grad()
def test_a_replay_never_keeps_a_mask_folded_from_the_recordings_values(remote):
    """The recording's padding mask is all ones (the attention looks causal when folded); replays with
    a padded position, then all ones again, equal eager: no fusion fact outlives the value it came from."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    qd, kd, vd = (t.to(DEV) for t in (q, k, v))
    full = torch.ones(1, 8, dtype=torch.long)
    padded = full.clone()
    padded[0, 2] = 0
    f = genie.compile(_attend)
    for pad in (full, full, padded, padded, full):
        torch.testing.assert_close(f(qd, kd, vd, pad.to(DEV)).cpu(), _attend(q, k, v, pad))
    assert f.replays >= 3
    assert not torch.allclose(_attend(q, k, v, padded), _attend(q, k, v, full))  # the masks matter
