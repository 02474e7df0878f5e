"""``genie.ray.ServerPool`` on a real local Ray (CPU only): actors in a placement group, each hosting a
``genie serve``; a pipeline across them; a server that dies is restarted by Ray and named to the
client, which reconnects; ``genie pool`` is the command-line form. One pool for the module."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch
from _server_fixtures import using

import genie
from genie.runtime import RemoteBackend, ServerSet

ray = pytest.importorskip("ray")
from genie.ray import ServerPool  # noqa: E402

torch.set_num_threads(1)
D0, D1 = "remote_accelerator:0", "remote_accelerator:1"


@pytest.fixture(scope="module")
def pool() -> Iterator[ServerPool]:
    started = time.monotonic()
    # half a CPU per server: the local cluster keeps one CPU for the command-line test's pool
    with ServerPool(2, num_gpus_per_server=0, device="cpu", num_cpus=2, num_cpus_per_server=0.5) as p:
        print(f"\nServerPool(2) ready in {time.monotonic() - started:.1f} s (Ray started here)")
        yield p


def connected(pool: ServerPool) -> ServerSet:
    return ServerSet([RemoteBackend(a, pool.token, index=i) for i, a in enumerate(pool.addresses)])


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def test_the_pool_reports_addresses_token_and_server_pids(pool):
    assert len(pool.addresses) == 2 and len(set(pool.addresses)) == 2
    assert re.fullmatch(r"[0-9a-f]{32}", pool.token)
    for pid, address in zip(pool.pids, pool.addresses, strict=True):
        cmd = _cmdline(pid)
        assert "genie serve" in cmd and f"--port {address.rpartition(':')[2]}" in cmd
        assert pool.token not in cmd  # the token travels in the environment, not on the command line


def test_a_pipeline_across_the_pool_equals_eager(pool):
    torch.manual_seed(0)
    first, second = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = second(torch.relu(first(x)))
    with using(connected(pool)) as b, torch.no_grad():
        assert torch.remote_accelerator.device_count() == 2
        first.to(D0)
        second.to(D1)
        got = second(torch.relu(first(x.to(D0))).to(D1))
        torch.testing.assert_close(got.cpu(), want)
        assert b.stats.extra["transfers"] == 1  # the pool's servers allow each other as peers


def test_a_dead_server_is_restarted_and_named_and_the_client_reconnects(pool):
    with using(connected(pool)):
        kept = torch.arange(4.0, device=D1) * 2
        assert kept.cpu().tolist() == [0.0, 2.0, 4.0, 6.0]
        old = pool.pids[1]
        os.killpg(old, signal.SIGKILL)  # the whole server: its front and its workers
        with pytest.raises(genie.ConnectionLostError, match=f"remote_accelerator:1.*{pool.addresses[1]}"):
            (kept + 1).cpu()  # its value was on the server that died
        assert pool.pids[1] != old  # asking waits for Ray's restart: a new server on the same address
        assert (torch.ones(2, device=D1) * 3).cpu().tolist() == [3.0, 3.0]  # reconnected by itself
        assert (torch.ones(2, device=D0) * 4).cpu().tolist() == [4.0, 4.0]


def test_genie_pool_on_the_command_line(pool):
    """``genie pool --servers 1`` joins the running cluster, prints how to connect, stops on SIGTERM."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "genie", "pool", "--servers", "1", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        lines = {}
        for line in proc.stdout:  # type: ignore[union-attr]
            key, sep, value = line.strip().partition("=")
            if sep:
                lines[key] = value
            if "GENIE_TOKEN" in lines:
                break
        assert re.fullmatch(r"[0-9a-f]{32}", lines["GENIE_TOKEN"])
        b = RemoteBackend(lines["GENIE_SERVER"], lines["GENIE_TOKEN"], insecure=True)  # the node's address
        with using(b):
            assert (torch.arange(3.0, device=D0) + 1).cpu().tolist() == [1.0, 2.0, 3.0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
