"""Memory the server holds after runs end, and memory it once did not count, against a real
``genie serve``: kept views count their whole storage, a tiny constant never pins its receive block,
unread replies are bounded and counted, frames read ahead of the work are reserved, and a handle can
never be named twice (which once inflated ``resident_bytes`` for good)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
from _server_fixtures import check_served, handshake, reply, serving, using

import genie
from genie.runtime._remote import RemoteBackend
from genie.server._residency import ConstantPool, Residents
from genie.transport import Message, Protocol


def stats(s: socket.socket, p: Protocol, req_id: int) -> dict:
    s.sendall(p.send_bytes(Message("stats", {"id": req_id})))
    got = reply(s, p)
    assert got.kind == "report", got.fields
    return got["stats"]


def run_message(req_id: int, graph, inputs: list, **fields) -> Message:
    base = {"id": req_id, "graph": "bytes", "inputs": len(inputs), "consts": [], "fetch": [], "keep": []}
    return Message("run", {**base, **fields}, [graph.to_bytes(), *inputs])


def worker_rss(b: RemoteBackend, srv) -> int:
    """Resident memory of the process that runs this connection's programs."""
    pid = b.server_stats().get("pid", srv.proc.pid)
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def wait_for(cond, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


# -- kept values count by storage ------------------------------------------------------------------
def base_and_view(x):
    y = x * 2
    return y, y[:1]


def test_a_kept_view_of_a_freed_value_counts_its_whole_storage():
    x = torch.randn(1 << 20)  # 4 MiB
    graph = genie.trace(base_and_view, x)
    with serving() as srv:
        s, p = handshake(srv)
        try:
            s.sendall(p.send_bytes(run_message(1, graph, [x], keep=[0, 1], names=[11, 12])))
            assert reply(s, p).kind == "result"
            assert stats(s, p, 2)["resident_bytes"] >= 4 << 20
            s.sendall(p.send_bytes(Message("free", {"handles": [11]})))  # the base goes, the view stays
            held = stats(s, p, 3)["resident_bytes"]
            assert held >= 4 << 20, f"a kept 1-element view holds a 4 MiB storage, counted {held}"
            s.sendall(p.send_bytes(Message("fetch", {"id": 4, "handle": 12})))
            got = reply(s, p)
            assert got.kind == "result" and torch.equal(got.buffers[0], x[:1] * 2)
            s.sendall(p.send_bytes(Message("free", {"handles": [12]})))
            assert stats(s, p, 5)["resident_bytes"] == 0
        finally:
            s.close()


def test_the_storage_a_kept_view_holds_counts_against_the_memory_limit():
    x = torch.randn(3 << 20)  # 12 MiB
    graph = genie.trace(base_and_view, x)
    with serving("--memory-limit", "28M") as srv:
        s, p = handshake(srv)
        try:
            s.sendall(p.send_bytes(run_message(1, graph, [x], keep=[0, 1], names=[11, 12])))
            assert reply(s, p).kind == "result"
            s.sendall(p.send_bytes(Message("free", {"handles": [11]})))
            big = genie.trace(lambda z: (z + 1).sum(), torch.randn(3 << 20))  # a 12 MiB peak more
            s.sendall(p.send_bytes(run_message(2, big, [x], fetch=[0])))
            err = reply(s, p)
            assert err.kind == "error" and err["kind"] == "memory", err.fields
            s.sendall(p.send_bytes(Message("free", {"handles": [12]})))  # now the storage goes
            s.sendall(p.send_bytes(run_message(3, big, [torch.ones(3 << 20)], fetch=[0])))
            ok = reply(s, p)
            assert ok.kind == "result" and ok.buffers[0].item() == 2 * (3 << 20), ok.fields
        finally:
            s.close()


def test_a_name_in_use_is_never_overwritten():
    pool = ConstantPool()
    residents = Residents(pool)
    a, b = torch.randn(1024), torch.randn(16)
    assert residents.keep([a], names=[5]) == [5]
    with pytest.raises(genie.GenieError, match="handle 5 is already in use"):
        residents.keep([b], names=[5])
    assert residents[5] is a and pool.resident_bytes == a.nbytes
    residents.close()
    assert pool.resident_bytes == 0


def test_a_server_chosen_handle_can_never_be_a_pending_runs_name():
    """A run without names gets a handle the server picks; a pending run that named the handle the
    server was about to pick (learned from its previous one) once had its value overwritten, and the
    first value was then held and counted for good."""
    x = torch.randn(4, 4)
    small = genie.trace(lambda z: z * 2, x)
    staged = genie.trace(lambda z: torch.relu(z) + 1, x)
    sched = genie.schedule(staged).stage_schedule().to_wire()
    big = genie.trace(lambda z: z.expand(1 << 18).clone(), torch.zeros(()))  # 1 MiB kept
    with serving() as srv:
        s, p = handshake(srv)
        try:
            s.sendall(p.send_bytes(run_message(1, small, [x], keep=[0])))
            (h0,) = reply(s, p)["handles"]
            try:  # a run naming the next server handle, waiting for its streamed input
                s.sendall(p.send_bytes(run_message(2, staged, [], keep=[0], names=[h0 + 1], stages=sched,
                                                   stream=[0])))
                s.sendall(p.send_bytes(run_message(3, big, [torch.zeros(())], keep=[0])))  # no names
                first = reply(s, p)
                if first.kind == "result":  # the server picked h0 + 1 for run 3's value
                    s.sendall(p.send_bytes(Message("input", {"id": 2, "input": 0}, [x])))
                    reply(s, p)
            except (OSError, AssertionError):
                pass  # the server refused the name and closed this connection: fine
        finally:
            s.close()
        with using(RemoteBackend(srv.address, srv.token)) as b:
            wait_for(lambda: b.server_stats()["open_connections"] <= 1, "the raw connection closed")
            wait_for(lambda: b.server_stats()["resident_bytes"] == 0, "resident_bytes back to 0", 20)
            check_served(b)


# -- a constant never pins a receive block ---------------------------------------------------------
def test_a_tiny_inline_constant_does_not_pin_its_receive_block():
    n = 6 << 20  # a 24 MiB input in the same frame as a 4-byte constant, each run a new constant
    with serving("--memory-limit", "96M") as srv, using(RemoteBackend(srv.address, srv.token)) as b:
        x = torch.randn(n)
        check_served(b)
        before = worker_rss(b, srv)
        for i in range(12):
            c = torch.tensor([float(i)])
            graph = genie.trace(lambda z, c=c: z.sum() + c, torch.randn(n))  # nothing big allocated
            (got,) = b.run(graph, [x], fetch=[0], keep=[], constants=graph.constants).fetched
            torch.testing.assert_close(got, x.sum() + c)
        after = b.server_stats()
        assert after["constants"] >= 12 and after["constant_bytes"] < 1 << 20  # each its own 4 bytes
        grown = worker_rss(b, srv) - before
        assert grown < 150 << 20, f"12 tiny constants held {grown >> 20} MiB of receive blocks"
        assert after.get("frame_bytes", 0) == 0


# -- replies: bounded, counted, and the client that does not read them is not read ------------------
def test_unread_replies_are_bounded_and_counted():
    result = 4 << 20
    graph = genie.trace(lambda z: z.expand(result // 4).clone(), torch.zeros(()))
    runs = 150  # 600 MiB of results if all were queued
    with serving() as srv, using(RemoteBackend(srv.address, srv.token)) as b:
        check_served(b)
        before, rss0 = b.server_stats(), worker_rss(b, srv)
        s, p = handshake(srv)
        frames = [p.send_bytes(run_message(i + 1, graph, [torch.zeros(())], fetch=[0])) for i in range(runs)]
        sent = threading.Event()

        def send() -> None:
            try:
                for f in frames:
                    s.sendall(f)  # blocks for good once the server stops reading us
                sent.set()
            except OSError:
                pass

        s.settimeout(None)
        threading.Thread(target=send, daemon=True).start()
        try:
            def settled() -> bool:
                now = b.server_stats()
                return now.get("reply_backpressure", 0) > 0 or now["runs"] - before["runs"] >= runs

            wait_for(settled, "the server either stops reading or has run everything")
            now = b.server_stats()
            grown = worker_rss(b, srv) - rss0
            assert grown < 300 << 20, f"{grown >> 20} MiB held for a client that reads nothing"
            assert now["reply_bytes"] <= (64 << 20) + 17 * result, now["reply_bytes"]  # + --max-runs + 1
            assert now["runs"] - before["runs"] < runs  # it stopped taking runs from us
        finally:
            s.close()
        wait_for(lambda: b.server_stats()["reply_bytes"] == 0, "the dropped replies are uncounted")
        check_served(b)


# -- frames read ahead of the work are reserved when they arrive -----------------------------------
def test_frames_past_max_runs_are_reserved_and_refused_past_the_limit():
    x = torch.randn(4, 4)
    staged = genie.trace(lambda z: torch.relu(z) + 1, x)
    sched = genie.schedule(staged).stage_schedule().to_wire()
    n = 6 << 20  # 6 MiB inputs; 20 of them: twice the limit
    total = genie.trace(lambda z: z.sum(), torch.zeros(n // 4))
    with serving("--memory-limit", "64M", "--max-runs", "1") as srv:
        s, p = handshake(srv)
        try:
            # the one run slot is held by a run waiting for its streamed input
            s.sendall(p.send_bytes(run_message(1, staged, [], fetch=[0], stages=sched, stream=[0])))
            for i in range(20):  # read, not admitted: each must be counted as it is read
                s.sendall(p.send_bytes(run_message(100 + i, total, [torch.ones(n // 4)], fetch=[0])))
            err = reply(s, p)  # answered while run 1 still holds the slot
            assert err.kind == "error" and err["kind"] == "memory", err.fields
            assert "incoming frame" in err["message"] and "memory limit" in err["message"]
            s.sendall(p.send_bytes(Message("input", {"id": 1, "input": 0}, [x])))
            replies = {err["id"]: err}
            while len(replies) < 21:
                r = reply(s, p)
                replies[r["id"]] = r
            ok = replies.pop(1)
            assert ok.kind == "result" and torch.equal(ok.buffers[0], torch.relu(x) + 1)
            for r in replies.values():  # each a right answer, or that request alone refused
                assert r.kind == "result" and r.buffers[0].item() == n // 4 or \
                    r.kind == "error" and r["kind"] == "memory", r.fields
            assert any(r.kind == "result" for r in replies.values())
            after = stats(s, p, 999)
            assert after["frame_bytes"] == 0 and after["running_bytes"] == 0
        finally:
            s.close()
        with using(RemoteBackend(srv.address, srv.token)) as b:
            check_served(b)
