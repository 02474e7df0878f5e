"""``torch.remote_accelerator`` answers what a CUDA user asks ``torch.cuda`` (issue 18): synchronize,
memory_allocated, max_memory_allocated, get_device_name, get_device_properties, is_available,
device_count, answered by a real ``genie serve``; and ``pin_memory()`` behaves as on CUDA."""

from __future__ import annotations

import socket

import _server_fixtures as fx
import pytest
import torch

import genie
from genie.runtime import LocalBackend, RemoteBackend

server, remote = fx.server, fx.remote  # fixtures, by name
DEV = "remote_accelerator:0"
acc = torch.remote_accelerator  # type: ignore[attr-defined]


@pytest.fixture
def alone():
    """A server of this test's own: no other client's values come or go while it measures."""
    with fx.serving() as s, fx.using(RemoteBackend(s.address, s.token)) as b:
        yield b


def test_memory_allocated_counts_what_the_server_holds(alone):
    before = acc.memory_allocated()
    kept = torch.ones(512, 512, device=DEV) * 3  # 1 MiB, made and kept on the server
    acc.synchronize()
    grown = acc.memory_allocated() - before
    assert grown >= 512 * 512 * 4
    assert acc.max_memory_allocated() >= acc.memory_allocated()
    assert acc.memory_allocated(0) == acc.memory_allocated("remote_accelerator:0")
    assert float(kept[0, 0]) == 3.0


def _slow(x: torch.Tensor) -> tuple[torch.Tensor]:
    for _ in range(40):  # about a second of the server's time on one core
        x = torch.tanh(x @ x)
    return (torch.cat([x] * 8),)  # 8 MiB kept, from a 1 MiB input


async def test_synchronize_waits_for_submitted_runs(alone):
    graph = genie.trace(_slow, torch.zeros(512, 512))
    before = acc.memory_allocated()
    (y,) = await genie.execute(graph, torch.randn(512, 512) / 512, fetch=False)  # returns at once
    acc.synchronize()
    # the run has ended and kept its 8 MiB result: had synchronize not waited, the server would
    # answer while the run still computes, holding its input at most
    assert acc.memory_allocated() - before >= 8 * 512 * 512 * 4
    (got,) = await genie.fetch(y)
    assert got.shape == (8 * 512, 512)


def test_synchronize_runs_what_this_thread_has_pending(remote):
    x = torch.arange(4.0, device=DEV)
    y = x * 2  # recorded, pending
    rounds = genie.stats()["round_trips"]
    acc.synchronize()
    assert genie.stats()["round_trips"] > rounds
    assert y.tolist() == [0.0, 2.0, 4.0, 6.0]


def test_device_name_and_properties_come_from_the_server(server):
    with fx.serving("--memory-limit", "256MiB") as capped, \
            fx.using(RemoteBackend(capped.address, capped.token)):
        props = acc.get_device_properties()
        assert props.total_memory == 256 << 20  # this server's --memory-limit, not this machine's
        assert props.type == "cpu" and props.name == acc.get_device_name()
        assert acc.get_device_name().startswith("CPU")
    with fx.using(RemoteBackend(server.address, server.token)):
        assert acc.get_device_properties().total_memory > 256 << 20  # the shared one has no limit


def test_is_available_asks_the_server(remote):
    assert acc.is_available()
    assert acc.device_count() >= 1
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with fx.using(RemoteBackend(f"127.0.0.1:{port}", "token")):
        assert acc.is_available() is False


def test_device_indices_are_checked(remote):
    with pytest.raises(ValueError, match="invalid device index 8"):
        acc.memory_allocated(8)
    with pytest.raises(ValueError, match="expected a remote_accelerator device"):
        acc.get_device_name("cpu")
    with pytest.raises(ValueError, match="invalid device index 1"):  # one server: one device
        acc.get_device_name(1)


def test_in_process_says_there_is_no_server_to_ask():
    with fx.using(LocalBackend("cpu")):
        with pytest.raises(NotImplementedError, match="GENIE_SERVER=inprocess"):
            acc.memory_allocated()
        y = torch.ones(3, device=DEV) + 1
        acc.synchronize()  # runs what is pending, nothing to wait for
        assert acc.is_available()
        assert y.tolist() == [2.0, 2.0, 2.0]


# -- pin_memory -----------------------------------------------------------------------------------
def test_pin_memory_of_a_host_tensor_is_a_host_copy(remote):
    x = torch.randn(4, 3)
    pinned = x.pin_memory()
    assert pinned.device.type == "cpu" and torch.equal(pinned, x)
    x.add_(1)  # a copy, as CUDA's pinned one is
    assert not torch.equal(pinned, x)
    y = pinned.to(DEV, non_blocking=True) * 2  # uploads as any host tensor does
    torch.testing.assert_close(y.cpu(), (x - 1) * 2)


def test_a_dataloader_pins_its_batches(remote):
    data = torch.randn(8, 5)
    loader = torch.utils.data.DataLoader(data, batch_size=4, pin_memory=True)
    batches = list(loader)
    torch.testing.assert_close(torch.cat(batches), data)
    total = sum(b.to(DEV).sum() for b in batches)
    torch.testing.assert_close(total.cpu(), data.sum())


def test_a_remote_tensor_cannot_be_pinned_and_is_not_pinned(remote):
    x = torch.randn(3, device=DEV)
    y = x + 1  # pending: asking whether it is pinned must not run it
    rounds = genie.stats()["round_trips"]
    assert y.is_pinned() is False
    assert genie.stats()["round_trips"] == rounds
    with pytest.raises(RuntimeError, match="only CPU tensors can be pinned"):
        y.pin_memory()
