"""Many clients at once: trio tasks multiplexed on one connection, and many connections."""

from __future__ import annotations

import re
import time

import _server_fixtures as fx
import pytest
import torch
import trio
from _graphs import F32, meta, node

import genie
from genie.graph import CONST, INPUT, RESIDENT, Graph, Ref, TensorMeta, content_digest
from genie.runtime._remote import RemoteBackend
from genie.transport import Message, Protocol
from genie.transport._protocol import VERSION

server, remote = fx.server, fx.remote  # fixtures, by name

CLIENTS = 16


def mlp_graph():
    torch.manual_seed(3)
    w1, w2 = torch.randn(32, 64), torch.randn(64, 8)
    fn = lambda x: torch.relu(x @ w1) @ w2  # noqa: E731
    return genie.trace(fn, torch.randn(4, 32)), fn


async def test_16_concurrent_executes_on_one_connection(remote):
    graph, fn = mlp_graph()
    inputs = [torch.randn(4, 32) for _ in range(CLIENTS)]
    results: dict[int, torch.Tensor] = {}

    async def client(i: int) -> None:
        for _ in range(3):
            (results[i],) = await genie.execute(graph, inputs[i])

    async with trio.open_nursery() as n:
        for i in range(CLIENTS):
            n.start_soon(client, i)
    for i in range(CLIENTS):
        torch.testing.assert_close(results[i], fn(inputs[i]))
    assert remote.stats.extra["connections"] == 1
    assert remote.stats.template_hits >= CLIENTS  # one registration, the rest fill its template


async def test_16_clients_on_their_own_connections(server):
    graph, fn = mlp_graph()
    backends = [RemoteBackend(server.address, server.token) for _ in range(CLIENTS)]
    inputs = [torch.randn(4, 32) for _ in range(CLIENTS)]
    results: dict[int, torch.Tensor] = {}
    try:
        async def client(i: int) -> None:
            b = backends[i]
            for _ in range(3):
                r = await b.run_async(graph, [inputs[i]], fetch=[0], keep=[], constants=graph.constants)
                results[i] = r.fetched[0]

        async with trio.open_nursery() as n:
            for i in range(CLIENTS):
                n.start_soon(client, i)
        for i in range(CLIENTS):
            torch.testing.assert_close(results[i], fn(inputs[i]))
        # the weights went up once for the whole server; other clients found them there
        assert sum(b.stats.uploads_skipped for b in backends) >= 2 * (CLIENTS - 1)
    finally:
        for b in backends:
            b.close()


def test_threads_share_one_connection(remote):
    import threading

    graph, fn = mlp_graph()
    inputs = [torch.randn(4, 32) for _ in range(8)]
    results: dict[int, torch.Tensor] = {}

    def worker(i: int) -> None:
        r = remote.run(graph, [inputs[i]], fetch=[0], keep=[], constants=graph.constants)
        results[i] = r.fetched[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        torch.testing.assert_close(results[i], fn(inputs[i]))


# -- concurrent runs of one connection, as if sequential ------------------------------------------
# Raw frames, so that a test posts runs back to back and names their kept values itself (``names``),
# as a pipelining client does, and sees the order their replies come in.
H, V = 1001, 1002  # client-chosen handles


class Raw:
    """One raw connection: post frames, collect replies by id in the order they arrive."""

    def __init__(self, server) -> None:
        self.s = fx.raw_connection(server)
        self.p = Protocol("client")
        self.send(Message("hello", {"version": VERSION, "token": server.token}))
        assert self._next().kind == "welcome"
        self.replies: dict[int, Message] = {}
        self.arrived: list[int] = []  # reply ids, in arrival order

    def send(self, msg: Message) -> None:
        self.s.sendall(self.p.send_bytes(msg))

    def _next(self) -> Message:
        self.s.settimeout(60)
        while True:
            ev = self.p.next_event()
            if isinstance(ev, Message):
                return ev
            data = self.s.recv(1 << 20)
            assert data, "the server closed the connection"
            self.p.receive_data(data)

    def reply(self, req_id: int) -> Message:
        while req_id not in self.replies:
            msg = self._next()
            self.replies[msg["id"]] = msg
            self.arrived.append(msg["id"])
        return self.replies[req_id]

    def value(self, req_id: int) -> torch.Tensor:
        msg = self.reply(req_id)
        assert msg.kind == "result", msg.fields
        return msg.buffers[0]

    def run(self, req_id: int, graph: Graph, inputs=(), *, fetch=(0,), keep=(), names=None) -> None:
        fields = {"id": req_id, "graph": "bytes", "inputs": len(inputs), "consts": [], "fetch": list(fetch),
                  "keep": list(keep)}
        if names is not None:
            fields["names"] = list(names)
        self.send(Message("run", fields, [graph.to_bytes(), *inputs]))

    def close(self) -> None:
        self.s.close()


@pytest.fixture
def raw(server):
    r = Raw(server)
    yield r
    r.close()


def _slow(x, n: int = 40):
    y = x
    for _ in range(n):  # a few ms a step on one thread: a run that is still going when the next lands
        y = torch.tanh(y @ x)
    return y


def slow_graph(n: int = 40) -> Graph:
    return genie.trace(lambda x: _slow(x, n), torch.randn(256, 256))


def reads(handle: int, shape=(256, 256), op="aten.add.Scalar", k=1.0) -> Graph:
    """A run reading (or, with an in-place ``op``, writing) the resident ``handle``: fetch 0."""
    m = meta(*shape)
    return Graph([node(0, RESIDENT, handle, outputs=[m]), node(1, op, Ref(0), k, outputs=[m])], [Ref(1)])


def affine_(handle: int, shape, k: float, delay: int = 0) -> Graph:
    """``handle.mul_(2).add_(k)`` in place, after ``delay`` matmuls of its input (so that, were
    runs not kept in order, a quick one would overtake a slow one): the result depends on the order."""
    m, d = meta(*shape), meta(256, 256)
    waits = [node(0, INPUT, 0, outputs=[d]),
             *(node(i, "aten.mm.default", Ref(i - 1), Ref(0), outputs=[d]) for i in range(1, delay + 1))]
    n = len(waits)
    return Graph([*waits, node(n, RESIDENT, handle, outputs=[m]),
                  node(n + 1, "aten.mul_.Scalar", Ref(n), 2.0, outputs=[m]),
                  node(n + 2, "aten.add_.Scalar", Ref(n + 1), k, outputs=[m])], [Ref(n + 2)])


def test_a_run_posted_while_its_producer_runs_waits_for_it_and_reads_its_value(raw, server):
    x = torch.randn(256, 256) / 16
    raw.run(1, slow_graph(), [x], fetch=(), keep=[0], names=[H])
    raw.run(2, reads(H), fetch=[0])  # posted before run 1's reply: it names H, which run 1 keeps
    raw.send(Message("fetch", {"id": 3, "handle": H}))  # waits for run 1 too
    got = raw.value(2)
    assert raw.reply(1).kind == "result" and raw.reply(1)["handles"] == [H]
    assert raw.arrived.index(1) < raw.arrived.index(2)  # run 2 waited for run 1's end
    want = _slow(x)
    torch.testing.assert_close(got, want + 1)
    torch.testing.assert_close(raw.value(3), want)


def test_in_place_writes_to_one_resident_keep_arrival_order(raw):
    """A decode step writes its cache in place: a chain of such runs, posted at once with reads, an
    independent slow run and a view of the cache kept under its own handle, keeps arrival order."""
    cache = torch.arange(64 * 64, dtype=F32).reshape(64, 64) / 4096  # past TINY_BYTES: in threads
    make = Graph([node(0, INPUT, 0, outputs=[meta(64, 64)]),
                  node(1, "aten.clone.default", Ref(0), outputs=[meta(64, 64)]),
                  node(2, "aten.select.int", Ref(1), 0, 3, outputs=[TensorMeta((64,), (1,), F32, 192)])],
                 [Ref(1), Ref(2)])
    raw.run(1, make, [cache], fetch=(), keep=[0, 1], names=[H, V])  # V: row 3 of H, same storage
    want, wait = cache.clone(), torch.randn(256, 256) / 16
    req, checks = 2, []
    for k in range(12):
        if k == 4:
            raw.run(req, slow_graph(20), [torch.randn(256, 256) / 16])  # independent: runs beside
            req += 1
        delay = 12 if k % 2 == 0 else 0
        if k % 3 == 2:  # through the view: shares H's storage, so it keeps its place as well
            raw.run(req, affine_(V, (64,), float(k), delay), [wait])
            want[3].mul_(2).add_(k)
            checks.append((req, want[3].clone()))
        else:
            raw.run(req, affine_(H, (64, 64), float(k), delay), [wait])
            want.mul_(2).add_(k)
            checks.append((req, want.clone()))
        req += 1
        raw.run(req, reads(H, (64, 64)))  # a read between writes sees exactly the writes before it
        checks.append((req, want + 1))
        req += 1
    for r, expect in checks:
        torch.testing.assert_close(raw.value(r), expect)
    raw.send(Message("fetch", {"id": req, "handle": H}))
    torch.testing.assert_close(raw.value(req), want)


def test_a_run_reading_a_handle_whose_producer_failed_says_so(raw):
    x, bad = torch.randn(256, 256) / 16, torch.tensor([1000])
    failing = genie.trace(lambda x, i: (_slow(x, 30), _slow(x, 30).index_select(0, i)), x, torch.tensor([0]))
    raw.run(1, failing, [x, bad], fetch=[1], keep=[0], names=[H])  # index 1000: fails at its end
    raw.run(2, reads(H))  # posted while run 1 still computes
    assert raw.reply(1).kind == "error"
    err = raw.reply(2)
    assert err.kind == "error" and f"handle {H}" in err["message"]
    assert "run 1, which was to keep it, failed" in err["message"], err["message"]
    raw.run(3, reads(H))  # a late reader learns why as well
    assert "run 1, which was to keep it, failed" in raw.reply(3)["message"]
    x2 = torch.randn(4, 4)  # the name is free again: a new run may keep a value under it
    raw.run(4, genie.trace(lambda x: x * 2, x2), [x2], fetch=(), keep=[0], names=[H])
    raw.run(5, reads(H, (4, 4)))
    torch.testing.assert_close(raw.value(5), x2 * 2 + 1)


def test_cancelling_a_producer_fails_its_waiting_readers_only(raw):
    x, y = torch.randn(256, 256) / 16, torch.randn(256, 256) / 16
    raw.run(1, slow_graph(400), [x], fetch=(), keep=[0], names=[H])  # seconds, if it ran to the end
    raw.run(2, reads(H))  # waits for run 1
    raw.run(3, slow_graph(5), [y])  # independent
    raw.send(Message("cancel", {"id": 1}))
    assert raw.reply(1)["kind"] == "cancelled"
    assert "run 1, which was to keep it, failed" in raw.reply(2)["message"]
    torch.testing.assert_close(raw.value(3), _slow(y, 5))


def test_a_free_posted_right_after_a_run_reading_the_handle_waits_for_it(raw):
    x, g = torch.randn(256, 256) / 16, torch.randn(256, 256) / 16
    raw.run(1, genie.trace(lambda x: x.clone(), x), [x], fetch=(), keep=[0], names=[H])
    assert raw.reply(1).kind == "result"
    raw.run(9, slow_graph(), [g], fetch=(), keep=[0], names=[V])  # run 2 waits for this one (V) ...
    # ... and reads H, after it: the free comes right behind run 2, then a new value named H
    m = meta(256, 256)
    loop = Graph([node(0, RESIDENT, H, outputs=[m]), node(1, RESIDENT, V, outputs=[m]),
                  node(2, "aten.add.Tensor", Ref(0), Ref(1), outputs=[m]),
                  *(node(i, "aten.mm.default", Ref(i - 1), Ref(0), outputs=[m]) for i in range(3, 30))],
                 [Ref(29)])
    raw.run(2, loop)
    raw.send(Message("free", {"handles": [H]}))
    raw.run(3, reads(H))  # after the free: gone, whatever run 2 is doing
    y = torch.randn(4, 4)
    raw.run(4, genie.trace(lambda y: y + 0, y), [y], fetch=(), keep=[0], names=[H])  # the name reused
    raw.run(5, reads(H, (4, 4)))
    want = x + _slow(g)
    for _ in range(27):
        want = want @ x
    torch.testing.assert_close(raw.value(2), want, rtol=1e-3, atol=1e-3)
    err = raw.reply(3)
    assert err.kind == "error" and f"handle {H} is not resident" in err["message"]
    torch.testing.assert_close(raw.value(5), y + 1)


def test_runs_writing_a_shared_constant_beside_readers_of_it_are_not_refused(raw):
    """A run that writes a constant writes its own copy, so concurrent runs of one connection
    reading the shared one see it unchanged (the version check finds nothing to refuse)."""
    w = torch.arange(65536, dtype=F32).reshape(256, 256) / 65536
    d = content_digest(w)
    m = meta(256, 256)
    writer = Graph([node(0, CONST, d, outputs=[m]), node(1, "aten.mul_.Scalar", Ref(0), -1.0, outputs=[m]),
                    *(node(i, "aten.mm.default", Ref(i - 1), Ref(0), outputs=[m]) for i in range(2, 12))],
                   [Ref(11)])
    reader = Graph([node(0, CONST, d, outputs=[m]), node(1, "aten.sum.default", Ref(0), outputs=[meta()])],
                   [Ref(1)])
    raw.send(Message("run", {"id": 1, "graph": "bytes", "inputs": 0, "consts": [d], "fetch": [0], "keep": []},
                     [reader.to_bytes(), w]))
    for i in range(2, 14, 2):
        raw.run(i, writer)
        raw.run(i + 1, reader)
    for i in range(1, 14):
        assert raw.reply(i).kind == "result", raw.reply(i).fields
    for i in range(1, 14, 2):
        torch.testing.assert_close(raw.value(i), w.sum())


def test_a_client_flooding_runs_gets_at_most_max_runs_at_once(server):
    with fx.serving("--max-runs", "2", "--workers", "2") as s:
        r = Raw(s)
        try:
            xs = [torch.randn(256, 256) / 16 for _ in range(12)]
            for i, x in enumerate(xs):
                r.run(i + 1, slow_graph(10), [x])
            for i, x in enumerate(xs):
                torch.testing.assert_close(r.value(i + 1), _slow(x, 10))
            r.send(Message("stats", {"id": 99}))
            stats = r.reply(99)["stats"]
        finally:
            r.close()
    assert stats["peak_tasks_per_connection"] == 2  # bounded, and the bound was reached
    assert stats["runs"] == 12


# -- a long prefill does not hold up other sessions' decode steps ----------------------------------
def _prefill(x):
    for _ in range(150):  # ~1-2 s on one thread
        x = torch.tanh(x @ x) * 0.5
    return x.sum(0)


def _step(x):
    return torch.relu(x @ x.T).sum(0)


@pytest.mark.parametrize("max_runs", ["16", "1"])
async def test_a_long_prefill_does_not_hold_up_other_sessions_decode_steps(max_runs):
    """Server timestamps (a traced run's timeline, on the client's clock): five short steps of one
    session, posted while another session's prefill computes on the same connection, start and end
    before it ends; with --max-runs 1 (one request at a time: the old behaviour) they wait for it."""
    x, s = torch.randn(512, 512) / 24, torch.randn(64, 64)
    big, small = genie.schedule(genie.trace(_prefill, x)), genie.schedule(genie.trace(_step, s))
    with fx.serving("--workers", "2", "--max-runs", max_runs) as srv, \
            fx.using(RemoteBackend(srv.address, srv.token)) as b:
        def run(plan, inp):
            return b.run_async(plan.graph, [inp], fetch=[0], keep=[], constants=plan.graph.constants,
                               stages=plan.stage_schedule(), trace=True)

        await run(small, s)  # warm: both plans registered
        await run(big, x)
        prefill, steps = {}, []

        async def session_a() -> None:
            prefill["r"] = await run(big, x)

        async def session_b() -> None:
            await trio.sleep(0.3)  # not an assertion: lets the prefill start first
            for _ in range(5):
                steps.append(await run(small, s))

        async with trio.open_nursery() as n:
            n.start_soon(session_a)
            n.start_soon(session_b)
        stats = b.server_stats()
    p = prefill["r"].timeline["stages"]
    p_start, p_end = p[0][0], p[-1][1]
    ends = [r.timeline["stages"][-1][1] for r in steps]
    starts = [r.timeline["stages"][0][0] for r in steps]
    for r in steps:
        torch.testing.assert_close(r.fetched[0], _step(s))
    torch.testing.assert_close(prefill["r"].fetched[0], _prefill(x), rtol=1e-4, atol=1e-4)
    if max_runs == "16":
        assert all(p_start < st and e < p_end for st, e in zip(starts, ends, strict=True)), (p, starts, ends)
        assert stats.get("runs_ordered", 0) == 0  # disjoint residents: nobody waited for anybody
    else:
        assert all(st > p_end for st in starts), (p, starts)  # queued behind the prefill


# -- genie serve --verbose logs each connection ----------------------------------------------------
def test_verbose_logs_a_connections_open_handshake_and_close():
    with fx.serving("--verbose") as s:
        with fx.using(RemoteBackend(s.address, s.token)) as b:
            fx.check_served(b)
            fx.check_served(b)
        with pytest.raises(genie.AuthenticationError):
            RemoteBackend(s.address, "wrong").connect()
        for _ in range(100):  # the server writes the close line once it sees the socket close
            lines = [ln for ln in s.stderr_tail().splitlines() if ln.startswith("genie serve: 127.0.0.1:")]
            if sum("closed:" in ln for ln in lines) >= 1 and any("refused" in ln for ln in lines):
                break
            time.sleep(0.05)
    peers = {ln.split(": ")[1] for ln in lines}
    assert len(peers) == 2, lines  # one line prefix per connection: its peer address
    first = [ln.split(": ", 2)[2] for ln in lines if ln.split(": ")[1] == lines[0].split(": ")[1]]
    assert first[0] == "accepted" and first[1].startswith("hello ok"), first
    assert re.fullmatch(r"closed: by the client, after \d+\.\d\d s, 2 runs", first[-1]), first
    refused = [ln for ln in lines if ln.split(": ")[1] != lines[0].split(": ")[1]]
    assert [ln.split(": ", 2)[2] for ln in refused] == ["accepted", "refused: bad token"], refused
