"""The direct path of a blocking run (``runtime._direct``): ``.cpu()`` on a tiny program writes its
frame and reads its reply on the caller's own thread, with no hop through the bridge's loop.

Each test checks the answer against eager PyTorch, and that the path it means to test was taken
(``genie.stats()``: ``direct_runs`` read here, ``direct_handed_over`` to the loop past the budget).
Server errors, a dead server and Ctrl-C keep their meaning on this path.
"""

from __future__ import annotations

import signal
import threading
import time

import _server_fixtures as fx
import pytest
import torch

import genie
from genie.runtime import RemoteBackend, _direct

server, remote = fx.server, fx.remote  # fixtures, by name
DEV = "remote_accelerator:0"


def _extra(b: RemoteBackend, key: str) -> int:
    return b.stats.extra.get(key, 0)


def _posted_here(b: RemoteBackend) -> int:
    """Runs written on the caller's thread (their reply read there, or handed to the loop)."""
    return _extra(b, "direct_runs")


def _tiny(b: RemoteBackend) -> None:
    graph = genie.trace(lambda x: x * 2 + 1, torch.randn(3))
    x = torch.randn(3)
    (got,) = b.run(graph, [x], fetch=[0], keep=[], constants={}).fetched
    torch.testing.assert_close(got, x * 2 + 1)


def _until_direct(b: RemoteBackend) -> None:
    """Tiny runs until one has gone direct (the first connects through the loop, and the loop may
    be busy a moment after): the connection is then one the direct path uses."""
    before = _posted_here(b)
    for _ in range(50):
        _tiny(b)
        if _posted_here(b) > before:
            return
    raise AssertionError("no run took the direct path")


def test_tiny_blocking_runs_read_their_reply_on_the_callers_thread(remote):
    host = torch.arange(4.0)
    x = host.to(DEV)
    x.cpu()  # connected, the constant uploaded
    before = _extra(remote, "direct_runs")
    for i in range(20):
        torch.testing.assert_close((x + i).cpu(), host + i)
        assert (x * i).sum().item() == float(host.sum() * i)
    assert _extra(remote, "direct_runs") > before  # all of them, unless the loop was busy


def test_a_slow_run_is_handed_to_the_loops_reader(remote):
    """Past the budget the caller stops holding the loop: the reply comes through the reader, right."""
    host = torch.randn(512, 512) / 16
    x = host.to(DEV)
    x.cpu()
    before = _extra(remote, "direct_handed_over")
    y = x
    for _ in range(20):
        y = torch.tanh(y @ x)
    want = host
    for _ in range(20):
        want = torch.tanh(want @ host)
    torch.testing.assert_close(y.cpu(), want, atol=1e-4, rtol=1e-4)
    assert _extra(remote, "direct_handed_over") - before == 1


def test_a_server_error_on_the_direct_path_says_why_and_the_connection_lives(remote):
    graph = genie.trace(lambda x: x.view(3, 4) + 1, torch.randn(12))
    node = next(n for n in graph.nodes if n.op == "aten.view.default")
    node.args = (node.args[0], [5, 5])  # a view the data cannot take: fails on the server only
    _until_direct(remote)
    for _ in range(50):  # until one went direct (the loop may be busy a moment)
        before = _posted_here(remote)
        with pytest.raises(genie.RemoteExecutionError) as info:
            remote.run(graph, [torch.randn(12)], fetch=[0], keep=[], constants=graph.constants)
        assert info.value.op == "aten.view.default"
        assert "invalid for input of size 12" in info.value.remote_message
        if _posted_here(remote) > before:
            break
    else:
        raise AssertionError("no failing run took the direct path")
    _tiny(remote)
    fx.check_served(remote)


def test_a_server_killed_between_direct_runs_is_connection_lost_then_reconnects():
    with fx.serving() as srv:
        b = RemoteBackend(srv.address, srv.token)
        try:
            _until_direct(b)
            srv.kill()
            t0 = time.monotonic()
            with pytest.raises(genie.ConnectionLostError):
                _tiny(b)
            assert time.monotonic() - t0 < 5
            srv.restart()
            fx.check_served(b)  # a new connection, and right answers again
        finally:
            b.close()


@pytest.fixture
def sigint_raises():
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def _long(x, w):
    for _ in range(100):  # ~20 ms a matmul on one thread: seconds if it runs to the end
        x = torch.tanh(x @ w)
    return x.sum(0)


@pytest.mark.parametrize("budget", [60.0, _direct.BUDGET], ids=["read-here", "handed-over"])
def test_ctrl_c_while_waiting_cancels_the_run_and_the_connection_carries_on(budget, sigint_raises,
                                                                             monkeypatch):
    """Ctrl-C while this thread reads the reply itself (a budget longer than the run), or after it
    handed the reply to the loop: the server stops the run, and the connection still serves."""
    monkeypatch.setattr(_direct, "BUDGET", budget)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g) / 32
    graph = genie.trace(_long, x, w)
    with fx.serving() as s, fx.using(RemoteBackend(s.address, s.token)) as b:
        before = b.server_stats()
        _until_direct(b)  # the loop idle: the long run goes direct
        posted = _posted_here(b)
        main = threading.main_thread().ident
        timer = threading.Timer(0.5, lambda: signal.pthread_kill(main, signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                b.run(graph, [x, w], fetch=[0], keep=[], constants={})
        finally:
            timer.cancel()
        for _ in range(100):
            after = b.server_stats()
            if after.get("cancelled", 0) > before.get("cancelled", 0):
                break
            time.sleep(0.05)
        assert after.get("cancelled", 0) - before.get("cancelled", 0) == 1
        assert _posted_here(b) - posted >= 1  # server_stats' requests go through the loop
        _tiny(b)
        fx.check_served(b)


def test_runs_from_many_threads_at_once_all_come_back_right(remote):
    """Threads race for the direct path; whoever does not get it takes the loop: all answers right."""
    host = torch.arange(8.0)
    x = host.to(DEV)
    x.cpu()
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(25):
                got = (x * k + i).cpu()
                if not torch.equal(got, host * k + i):
                    raise AssertionError(f"thread {k}, step {i}: {got}")
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
