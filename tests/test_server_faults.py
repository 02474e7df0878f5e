"""Bad input, dead servers and memory pressure: each fails loudly, and only where it should."""

from __future__ import annotations

import gc
import json
import socket
import sys
import threading
import time

import _server_fixtures as fx
import pytest
import torch
import trio
from _server_fixtures import raw_connection, read_until_closed, serving, using

import genie
from genie.runtime import _connection
from genie.runtime._remote import RemoteBackend
from genie.transport import Message, Protocol
from genie.transport._protocol import MAGIC, MESSAGES, PREFIX, VERSION

server, remote = fx.server, fx.remote  # fixtures, by name


def small_graph():
    w = torch.randn(8, 8)
    return genie.trace(lambda x: torch.relu(x @ w) + 1, torch.randn(2, 8)), w


def check_served(b: RemoteBackend) -> None:
    """``b``'s connection still computes right answers."""
    graph, w = small_graph()
    x = torch.randn(2, 8)
    (got,) = b.run(graph, [x], fetch=[0], keep=[], constants=graph.constants).fetched
    torch.testing.assert_close(got, torch.relu(x @ w) + 1)


def slow_graph(seconds: float, n: int = 1024):
    """A graph that keeps a CPU server busy for about ``seconds`` (calibrated here, on one thread)."""
    x = torch.randn(n, n)
    t0 = time.perf_counter()
    for _ in range(3):
        x = torch.tanh(x @ x) * 0.5
    steps = max(3, int(seconds / ((time.perf_counter() - t0) / 3)))

    def fn(x):
        for _ in range(steps):
            x = torch.tanh(x @ x) * 0.5
        return x

    return genie.trace(fn, torch.randn(n, n))


def hello_bytes(token: str) -> tuple[Protocol, bytes]:
    p = Protocol("client")
    return p, p.send_bytes(Message("hello", {"version": VERSION, "token": token}))


# -- authentication -------------------------------------------------------------------------------
def test_bad_token_is_refused(server):
    with pytest.raises(genie.AuthenticationError, match="bad token"):
        genie.connect(server.address, token="not-the-token")
    b = RemoteBackend(server.address, "also-wrong")
    try:
        with pytest.raises(genie.AuthenticationError):
            check_served(b)
    finally:
        b.close()


def test_unreachable_server_is_connection_lost():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    b = RemoteBackend(f"127.0.0.1:{port}", "x")
    try:
        with pytest.raises(genie.ConnectionLostError, match="cannot reach"):
            b.connect()
    finally:
        b.close()


# -- hostile frames: each closes its own connection only ------------------------------------------
def after_hello(server, frame: bytes) -> bytes:
    _, hello = hello_bytes(server.token)
    return hello + frame


RUN = MESSAGES["run"].code
BAD = {
    "garbage": lambda s: b"\x16\x03\x01\x02\x00" + bytes(range(256)) * 4,
    "garbage after hello": lambda s: after_hello(s, b"GET / HTTP/1.1\r\n\r\n" * 10),
    "oversized": lambda s: after_hello(s, PREFIX.pack(MAGIC, VERSION, RUN, 10, 1 << 50) + b"x" * 10),
    "oversized before hello": lambda s: PREFIX.pack(MAGIC, VERSION, MESSAGES["hello"].code, 10, 1 << 30),
    "bad graph": lambda s: after_hello(s, _run_frame(b"GNG1\xff\xff\xff\x7f{")),
    "json bomb": lambda s: after_hello(s, PREFIX.pack(MAGIC, VERSION, RUN, 200_000, 0)
                                       + b"[" * 100_000 + b"]" * 100_000),
}


def _run_frame(graph_bytes: bytes) -> bytes:
    p = Protocol("client")
    p.state = p.state.READY
    return p.send_bytes(Message("run", {"id": 1, "graph": "bytes", "inputs": 0, "consts": [], "fetch": [],
                                        "keep": []}, [graph_bytes]))


@pytest.mark.parametrize("name", list(BAD))
def test_hostile_frames_close_only_their_connection(server, remote, name):
    check_served(remote)
    s = raw_connection(server)
    try:
        s.sendall(BAD[name](server))
        read_until_closed(s)  # the server hangs up (after an error frame at most)
    finally:
        s.close()
    check_served(remote)


def test_truncated_frame_closes_only_its_connection(server, remote):
    p, hello = hello_bytes(server.token)
    s = raw_connection(server)
    try:
        s.sendall(hello)
        p.receive_data(s.recv(65536))
        assert p.next_event().kind == "welcome"
        frame = p.send_bytes(Message("upload", {"id": 1, "digests": ["d"]}, [torch.randn(100_000)]))
        s.sendall(frame[: len(frame) // 2])
        check_served(remote)  # a half-received frame on one connection blocks nobody else
        s.shutdown(socket.SHUT_WR)
        read_until_closed(s)
    finally:
        s.close()
    check_served(remote)


def test_error_frame_says_why(server):
    s = raw_connection(server)
    try:
        s.sendall(after_hello(server, PREFIX.pack(MAGIC, VERSION, RUN, 10, 1 << 50)))
        data = read_until_closed(s)
    finally:
        s.close()
    p = Protocol("client")
    p.send(Message("hello", {"version": VERSION, "token": server.token}))
    p.receive_data(data)
    assert p.next_event().kind == "welcome"
    err = p.next_event()
    assert err.kind == "error" and err["kind"] == "protocol" and "too large" in err["message"]


# -- errors inside a run come back as exceptions; the connection lives on ------------------------
def test_unknown_op(remote):
    graph, _ = small_graph()
    node = next(n for n in graph.nodes if n.op.startswith("aten.relu"))
    node.op = "aten.definitely_not_an_op.default"
    with pytest.raises(genie.UnsupportedOpError, match="definitely_not_an_op"):
        remote.run(graph, [torch.randn(2, 8)], fetch=[0], keep=[], constants=graph.constants)
    node.op = "os.system"
    with pytest.raises(genie.UnsupportedOpError, match="os.system"):
        remote.run(graph, [torch.randn(2, 8)], fetch=[0], keep=[], constants=graph.constants)
    check_served(remote)


def test_dtype_mismatch(remote):
    graph, _ = small_graph()
    with pytest.raises(genie.RemoteExecutionError) as info:
        remote.run(graph, [torch.randn(2, 8, dtype=torch.float64)], fetch=[0], keep=[],
                   constants=graph.constants)
    assert info.value.op == "genie.input" and "float64" in str(info.value)
    check_served(remote)


def test_runtime_error_carries_op_and_remote_traceback(remote):
    graph = genie.trace(lambda x: x.view(3, 4) + 1, torch.randn(12))
    node = next(n for n in graph.nodes if n.op == "aten.view.default")
    node.args = (node.args[0], [5, 5])  # a view the data cannot take: fails on the server only
    with pytest.raises(genie.RemoteExecutionError) as info:
        remote.run(graph, [torch.randn(12)], fetch=[0], keep=[], constants=graph.constants)
    err = info.value
    assert err.op == "aten.view.default"
    assert "invalid for input of size 12" in err.remote_message
    assert "Traceback" in err.remote_traceback
    check_served(remote)


# -- server death ---------------------------------------------------------------------------------
def test_server_killed_mid_run_then_restarted():
    with serving() as srv:
        b = RemoteBackend(srv.address, srv.token)
        try:
            check_served(b)
            graph = slow_graph(6.0)  # killed long before it ends
            errors: list[BaseException] = []

            async def run_and_kill() -> None:
                async with trio.open_nursery() as n:
                    async def call() -> None:
                        try:
                            await b.run_async(graph, [torch.randn(1024, 1024)], fetch=[0], keep=[],
                                              constants=graph.constants)
                        except genie.ConnectionLostError as e:
                            errors.append(e)

                    n.start_soon(call)
                    await trio.sleep(0.5)
                    t0 = time.monotonic()
                    srv.kill()
                    with trio.fail_after(10):
                        while not errors:
                            await trio.sleep(0.01)
                    errors.append(time.monotonic() - t0)  # type: ignore[arg-type]

            trio.run(run_and_kill)
            assert isinstance(errors[0], genie.ConnectionLostError)
            assert errors[1] < 5
            with pytest.raises(genie.ConnectionLostError):  # down: the next call fails fast too
                check_served(b)
            srv.restart()
            check_served(b)  # and once it is back, the next call reconnects
        finally:
            b.close()


def test_hung_server_is_connection_lost_in_bounded_time(monkeypatch):
    monkeypatch.setattr(_connection, "PING_AFTER", 0.3)
    monkeypatch.setattr(_connection, "DEAD_AFTER", 1.5)
    with serving() as srv:
        b = RemoteBackend(srv.address, srv.token)
        try:
            check_served(b)
            srv.pause()  # SIGSTOP: the socket stays open, nothing answers
            graph, _ = small_graph()
            t0 = time.monotonic()
            with pytest.raises(genie.ConnectionLostError, match="not answered"):
                b.run(graph, [torch.randn(2, 8)], fetch=[0], keep=[], constants=graph.constants)
            assert time.monotonic() - t0 < 6
        finally:
            b.close()


def test_values_from_a_lost_connection_fail_clearly():
    with serving() as srv, using(RemoteBackend(srv.address, srv.token)):
        x = torch.randn(4, 4).to("remote_accelerator:0")
        y = x * 2
        y.cpu()  # y now lives on the server under a handle
        srv.restart()

        def use_y() -> str:
            try:
                (y + 1).cpu()
            except genie.ConnectionLostError as e:
                return str(e)  # leaving the handler drops the traceback and the temporary it holds
            return ""

        assert "lost" in use_y()
        gc.collect()  # the failed temporary (y + 1) must be gone, or the next flush needs it too
        z = torch.ones(2).to("remote_accelerator:0")
        assert (z + 1).cpu().tolist() == [2.0, 2.0]


# -- cancellation and frees -----------------------------------------------------------------------
async def test_cancelled_run_frees_what_it_kept(server, remote):
    graph = slow_graph(1.5)
    with trio.move_on_after(0.3) as scope:
        await remote.run_async(graph, [torch.randn(1024, 1024)], fetch=[], keep=[0],
                               constants=graph.constants)
    assert scope.cancelled_caught
    with trio.fail_after(30):
        while True:
            await trio.sleep(0.1)
            stats = await trio.to_thread.run_sync(remote.server_stats)
            if stats["resident_bytes"] == 0 and stats["runs"] >= 1:
                break


def test_a_finalizer_freeing_while_frees_are_taken_neither_deadlocks_nor_is_lost(remote):
    """A garbage collection can run while the bridge holds the free queue's lock (taking the
    frees): a LazyTensor's finalizer then frees on that same thread, under that lock."""
    (torch.ones(4).to("remote_accelerator:0") + 1).cpu()  # connected: free() queues
    done = threading.Event()

    def collect_inside() -> None:
        with remote._frees_lock:
            remote.free(987654321)
        done.set()

    t = threading.Thread(target=collect_inside, daemon=True)
    t.start()
    t.join(10)
    assert done.is_set(), "free() deadlocked under the free queue's own lock"
    assert 987654321 in remote._frees or not remote._frees  # queued, or already drained


def test_dropped_tensors_are_freed_in_batches(remote):
    xs = [torch.randn(64, 64).to("remote_accelerator:0") * 2 for _ in range(8)]
    [x.cpu() for x in xs[:1]]  # one flush keeps all eight on the server
    assert remote.server_stats()["resident_bytes"] >= 8 * 64 * 64 * 4
    sent = genie.stats()["bytes_sent"]
    del xs
    deadline = time.monotonic() + 10
    while remote.server_stats()["resident_bytes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert remote.server_stats()["resident_bytes"] == 0
    assert genie.stats()["bytes_sent"] - sent < 600  # eight frees in one small message (+ stats)


# -- memory limit ---------------------------------------------------------------------------------
def test_memory_limit_evicts_lru_constants_and_refuses_what_cannot_fit():
    # a run holds its constant, its input's frame (counted until the run is done) and its output
    with serving("--memory-limit", "3.125M") as srv:
        b = RemoteBackend(srv.address, srv.token)
        try:
            mb = 1 << 18  # floats in 1 MiB
            weights = [torch.full((mb,), float(i)) for i in range(4)]
            graphs = [genie.trace(lambda x, w=w: x + w, torch.zeros(mb)) for w in weights]

            def run(i: int) -> float:
                g = graphs[i]
                (out,) = b.run(g, [torch.zeros(mb)], fetch=[0], keep=[], constants=g.constants).fetched
                return float(out[0])

            assert [run(i) for i in range(4)] == [0.0, 1.0, 2.0, 3.0]
            stats = b.server_stats()
            assert stats["evictions"] >= 1 and stats["constant_bytes"] <= 3 << 20
            uploads = b.stats.uploads
            assert run(0) == 0.0  # evicted, so uploaded again: transparently
            assert b.stats.uploads > uploads
            w4 = torch.ones(4 * mb)
            big = genie.trace(lambda x: x + w4, torch.zeros(4 * mb))
            with pytest.raises(genie.RemoteMemoryError, match="memory limit"):
                b.run(big, [torch.zeros(4 * mb)], fetch=[0], keep=[], constants=big.constants)
            assert run(1) == 1.0  # still serving
        finally:
            b.close()


def test_stats_message_reports_json(remote):
    check_served(remote)
    stats = remote.server_stats()
    json.dumps(stats)
    assert stats["device"] == "cpu" and stats["runs"] >= 1


# -- content addressing cannot be spoofed ---------------------------------------------------------
def test_upload_under_a_wrong_digest_is_refused(server, remote):
    from genie.graph import content_digest

    real = torch.arange(1000.0)
    digest = content_digest(real)
    p, hello = hello_bytes(server.token)
    s = raw_connection(server)
    try:
        s.sendall(hello)
        p.receive_data(s.recv(65536))
        assert p.next_event().kind == "welcome"
        s.sendall(p.send_bytes(Message("upload", {"id": 1, "digests": [digest]}, [torch.zeros(1000)])))
        p.receive_data(read_until_closed(s))
        err = p.next_event()
        assert err.kind == "error" and "content digest" in err["message"]
    finally:
        s.close()
    graph = genie.trace(lambda x: x + real, torch.zeros(1000))
    assert list(graph.constants) == [digest]
    (out,) = remote.run(graph, [torch.zeros(1000)], fetch=[0], keep=[], constants=graph.constants).fetched
    assert torch.equal(out, real)  # the real weights, uploaded by the honest client


def test_constant_larger_than_the_max_frame_is_not_implemented():
    with serving("--max-frame", "1M") as srv:
        b = RemoteBackend(srv.address, srv.token)
        try:
            big = torch.randn(1 << 19)  # 2 MiB
            graph = genie.trace(lambda x: x + big, torch.zeros(1 << 19))
            with pytest.raises(NotImplementedError, match="chunked uploads"):
                b.run(graph, [torch.zeros(16)], fetch=[0], keep=[], constants=graph.constants)
            check_served(b)
        finally:
            b.close()


def test_big_uploads_show_a_progress_bar_on_a_terminal(server, monkeypatch, capsys):
    from genie.runtime import _session

    monkeypatch.setattr(_session, "PROGRESS_MIN", 1 << 20)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    b = RemoteBackend(server.address, server.token)
    try:
        w = torch.randn(1 << 20)  # 4 MiB
        graph = genie.trace(lambda x: x * w, torch.ones(1 << 20))
        (out,) = b.run(graph, [torch.ones(1 << 20)], fetch=[0], keep=[], constants=graph.constants).fetched
        assert torch.equal(out, w)
    finally:
        b.close()
    assert "genie upload" in capsys.readouterr().err


def test_writing_to_a_constant_does_not_change_it_for_others(server, remote):
    a = torch.ones(3).to("remote_accelerator:0")  # a constant, shared by content digest
    a.add_(1)
    assert a.cpu().tolist() == [2.0, 2.0, 2.0]
    b = torch.ones(3).to("remote_accelerator:0")  # the same digest: must still be ones
    assert (b * 1).cpu().tolist() == [1.0, 1.0, 1.0]
    w = torch.ones(3)  # another client, naming the same constant: it finds it on the server
    graph = genie.trace(lambda x: x * w, torch.full((3,), 5.0))
    other = RemoteBackend(server.address, server.token)
    try:
        (out,) = other.run(graph, [torch.full((3,), 5.0)], fetch=[0], keep=[],
                           constants=graph.constants).fetched
        assert out.tolist() == [5.0, 5.0, 5.0]
    finally:
        other.close()


def test_a_written_constant_keeps_its_new_value(remote):
    a = torch.ones(3).to("remote_accelerator:0")
    a.add_(1)
    a.cpu()
    assert (a * 1).cpu().tolist() == [2.0, 2.0, 2.0]


def test_a_run_bigger_than_the_max_frame_fails_here_and_the_connection_lives():
    with serving("--max-frame", "1M") as srv:
        b = RemoteBackend(srv.address, srv.token)
        try:
            graph = genie.trace(lambda x: x * 2, torch.zeros(1 << 19))
            with pytest.raises(genie.LocalProtocolError, match="max-frame"):
                b.run(graph, [torch.zeros(1 << 19)], fetch=[0], keep=[], constants=graph.constants)
            x = torch.zeros(1 << 17)  # 512 KiB in, 512 KiB out: fine both ways
            small = genie.trace(lambda x: x + 1, x)
            (out,) = b.run(small, [x], fetch=[0], keep=[], constants=small.constants).fetched
            assert float(out.sum()) == float(1 << 17)
            big = genie.trace(lambda x: x.repeat(8), x)  # 4 MiB back: a result is not limited
            (out,) = b.run(big, [x], fetch=[0], keep=[], constants=big.constants).fetched
            assert out.numel() == 1 << 20
        finally:
            b.close()
