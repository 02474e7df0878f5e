"""Many servers, one device each: ``remote_accelerator:i`` is server i (``genie.connect([...])``).

Two real ``genie serve`` processes that allow each other as ``--peers``; a pipeline across them
equals eager, and its hand-off goes server to server; a dead server is named, the other keeps
working, and a restarted one is reconnected to.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import _server_fixtures as fx
import pytest
import torch
from _server_fixtures import ServerProcess, stats_delta, using

import genie
from genie.runtime import RemoteBackend, ServerSet
from genie.transport import free_ports

server, remote = fx.server, fx.remote  # fixtures, by name
torch.set_num_threads(1)
acc = torch.remote_accelerator  # type: ignore[attr-defined]
D0, D1 = "remote_accelerator:0", "remote_accelerator:1"


@contextlib.contextmanager
def server_pair(*args: str) -> Iterator[list[ServerProcess]]:
    """Two servers on ports picked first, each naming the other in --peers, with one token."""
    token = os.urandom(8).hex()
    ports = free_ports(2)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    servers: list[ServerProcess] = []
    try:
        for i, p in enumerate(ports):
            servers.append(ServerProcess("--peers", addresses[1 - i], *args, token=token, port=p))
        yield servers
    finally:
        for s in servers:
            s.close()


def server_set(servers: list[ServerProcess]) -> ServerSet:
    return ServerSet([RemoteBackend(s.address, s.token, index=i) for i, s in enumerate(servers)])


@pytest.fixture(scope="module")
def pair() -> Iterator[list[ServerProcess]]:
    with server_pair() as servers:
        yield servers


@pytest.fixture
def two(pair: list[ServerProcess]) -> Iterator[ServerSet]:
    with using(server_set(pair)) as b:
        yield b


def test_device_count_is_the_number_of_servers(two, pair):
    assert acc.device_count() == 2
    pids = [two.server_stats(i)["pid"] for i in range(2)]
    assert pids[0] != pids[1]  # each index asks its own server
    assert acc.get_device_properties(1).type == "cpu"
    assert acc.memory_allocated(1) >= 0


def test_an_index_past_the_servers_raises_naming_them(two, pair):
    for call in (lambda: torch.ones(2, device="remote_accelerator:2"), lambda: acc.memory_allocated(2),
                 lambda: torch.randn(3).to("remote_accelerator:5")):
        with pytest.raises(ValueError, match="invalid device index") as info:
            call()
        assert pair[0].address in str(info.value) and pair[1].address in str(info.value)


def test_one_server_has_one_device(remote, server):
    assert acc.device_count() == 1
    with pytest.raises(ValueError, match=f"invalid device index 1.*{server.address}"):
        torch.zeros(2, device=D1)


def test_each_device_runs_on_its_own_server(two):
    before = [two.server_stats(i) for i in range(2)]
    a = torch.arange(6.0, device=D0) * 2
    b = torch.arange(6.0, device=D1) + 1
    assert a.cpu().tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert b.cpu().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert a.device.index == 0 and b.device.index == 1
    after = [two.server_stats(i) for i in range(2)]
    assert all(stats_delta(before[i], after[i])["runs"] >= 1 for i in range(2))


def test_mixing_devices_in_one_op_is_a_device_error(two):
    x = torch.randn(3, device=D0)
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.randn(3, device=D1)


def _layers() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    make = lambda: torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()  # noqa: E731
    return make(), make()


def test_two_stage_pipeline_equals_eager(two):
    """The issue's case: two encoder layers, one per device, no_grad, eval; .device is the truth."""
    first, second = _layers()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = second(first(x))
        r1, r2 = _layers()
        r1.to(D0)
        r2.to(D1)
        h = r1(x.to(D0))
        moved = h.to(D1)
        assert h.device == torch.device(D0) and moved.device == torch.device(D1)
        got = r2(moved)
        assert got.device == torch.device(D1)
        before = two.stats.extra["transfers"]
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    assert two.stats.extra["transfers"] > before  # the hand-off went server to server


def test_a_2mib_hand_off_costs_the_client_little(two):
    """Target: a 2 MiB stage hand-off costs the client at most 64 KiB."""
    x = torch.randn(512, 1024, device=D0)  # made on server 0: no upload
    torch.remote_accelerator.synchronize()
    h = x * 2 + 1  # 2 MiB on server 0
    before = genie.stats()
    total = h.to(D1).sum(dim=1)  # moved to server 1, reduced there
    got = total.cpu()
    delta = stats_delta(before, genie.stats())
    assert delta["bytes_sent"] + delta["bytes_received"] <= 64 << 10, delta
    assert delta["transfer_bytes"] == 2 << 20
    torch.testing.assert_close(got, h.cpu().sum(dim=1))  # the same value as read from server 0


def test_a_value_can_go_back_and_forth(two):
    a = torch.arange(8.0, device=D0)
    b = (a.to(D1) * 3).to(D0) + a  # 0 -> 1 -> 0
    assert b.device.index == 0
    assert b.cpu().tolist() == [4.0 * i for i in range(8)]
    c = b.to(D1)
    c.add_(1)  # in place on server 1: server 0's value is untouched
    assert c.cpu().tolist() == [4.0 * i + 1 for i in range(8)]
    assert b.cpu().tolist() == [4.0 * i for i in range(8)]


def test_a_write_after_to_is_not_seen_by_the_moved_value(two):
    """Program order: the peer reads the value as it was at ``.to()``, though the lender writes it
    in place right after (the lender's later runs wait until the peer has it)."""
    a = torch.arange(1 << 16, dtype=torch.float32, device=D0) * 1
    a.sum().item()  # kept on server 0
    for _ in range(3):
        moved = a.to(D1)
        a.mul_(-1)
        torch.testing.assert_close(moved.cpu(), -a.cpu())


def test_a_dead_server_is_named_and_the_other_keeps_working():
    with server_pair() as servers, using(server_set(servers)):
        on1 = torch.arange(4.0, device=D1) + 1
        assert on1.cpu().tolist() == [1.0, 2.0, 3.0, 4.0]
        servers[1].kill()
        started = time.monotonic()
        with pytest.raises(genie.ConnectionLostError, match=f"remote_accelerator:1.*{servers[1].address}"):
            (torch.ones(4, device=D1) * 2).cpu()
        assert time.monotonic() - started < 10  # the bound: a refused connect, not a timeout
        assert (torch.ones(3, device=D0) * 5).cpu().tolist() == [5.0, 5.0, 5.0]  # device 0 is fine
        servers[1].restart()  # same port: the client reconnects; what it kept there is gone
        assert (torch.ones(2, device=D1) * 7).cpu().tolist() == [7.0, 7.0]
        with pytest.raises(genie.ConnectionLostError):
            (on1 * 2).cpu()  # kept on the server that died


def test_embedded_servers_for_tests():
    """ServerSet.embedded(n) (genie.connect(embedded=n), GENIE_SERVER=embedded:n): n devices."""
    with using(ServerSet.embedded(2)) as b:
        assert acc.device_count() == 2
        x = torch.arange(4.0, device=D0)
        assert (x.to(D1) + 1).cpu().tolist() == [1.0, 2.0, 3.0, 4.0]
        assert b.stats.extra["transfers"] == 1


class TwoStage(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
        self.hand_off = "cpu"  # where stage 1's output goes: device 1, once the stages are placed
        self.recorded = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.recorded += 1  # runs only when genie.compile records, not when it replays
        return self.second(torch.relu(self.first(x)).to(self.hand_off))


def test_compiled_replays_across_two_servers(two):
    """genie.compile records a two-stage step once and replays it: each replay moves its hand-off
    server to server and equals eager."""
    torch.manual_seed(0)
    model = TwoStage()
    xs = [torch.randn(2, 8) for _ in range(4)]
    with torch.no_grad():
        want = [model(x) for x in xs]
    model.first.to(D0)
    model.second.to(D1)
    model.hand_off, model.recorded = D1, 0
    model.forward = genie.compile(model.forward)
    before = dict(genie.stats())
    with torch.no_grad():
        for x, w in zip(xs, want, strict=True):
            got = model(x.to(D0))
            assert got.device == torch.device(D1)
            torch.testing.assert_close(got.cpu(), w)
    assert model.recorded < len(xs)  # replayed
    assert stats_delta(before, genie.stats())["transfers"] == len(xs)


async def test_execute_runs_a_traced_program_across_two_servers(two):
    w1, w2 = torch.randn(8, 16), torch.randn(16, 4)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ w1).to(D1) @ w2

    graph = genie.trace(fn, torch.randn(2, 8))
    before = two.stats.extra["transfers"]
    for _ in range(2):
        x = torch.randn(2, 8)
        (got,) = await genie.execute(graph, x)
        torch.testing.assert_close(got, torch.relu(x @ w1) @ w2)
    assert two.stats.extra["transfers"] == before + 2


def test_genie_server_lists_the_servers(pair, monkeypatch):
    monkeypatch.setenv("GENIE_SERVER", f"{pair[0].address},{pair[1].address}")
    monkeypatch.setenv("GENIE_TOKEN", pair[0].token)
    with using(genie.runtime.backend_from_env()) as b:
        assert isinstance(b, ServerSet) and b.addresses == [pair[0].address, pair[1].address]
        assert acc.device_count() == 2
        assert (torch.ones(2, device=D1) + 1).cpu().tolist() == [2.0, 2.0]
