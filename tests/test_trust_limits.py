"""The server's resource limits against a hostile (authenticated) client: memory, worker threads,
big messages and idle connections. Each breaks nothing but the offender's own request or connection."""

from __future__ import annotations

import dataclasses
import threading
import time

import _server_fixtures as fx
import pytest
import torch
from _server_fixtures import check_served, handshake, raw_connection, read_until_closed, reply, serving, using

import genie
from genie.graph import Graph, Node, Ref, TensorMeta
from genie.runtime._remote import RemoteBackend
from genie.transport import LIMITS, Message, Protocol
from genie.transport._protocol import MAGIC, MESSAGES, PREFIX, VERSION

server = fx.server  # fixture, by name







def rss(srv) -> int:
    """The largest resident set among the server's processes (its tenant worker holds the data)."""
    def one(pid: int) -> int:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:")), 0)

    return max(one(pid) for pid in srv.pids())


# -- 5. memory: every run's peak is predicted and reserved; frames are admitted at their header ------
def test_a_run_whose_intermediate_exceeds_the_memory_limit_is_refused_before_it_runs():
    with serving("--memory-limit", "64M") as srv:
        b = RemoteBackend(srv.address, srv.token)
        try:
            # a 1 GiB intermediate (an expand is a view: the add allocates it), summed to a scalar
            graph = genie.trace(lambda x: (x.expand(1 << 18, 1024) + 1).sum(), torch.randn(1, 1024))
            with pytest.raises(genie.RemoteMemoryError, match="predicted peak of 10737") as e:
                b.run(graph, [torch.randn(1, 1024)], fetch=[0], keep=[], constants={})
            assert "memory limit of 67108864" in str(e.value) and "kept values" in str(e.value)
            assert rss(srv) < 900 << 20  # it was never allocated
            check_served(b)  # the same connection runs what fits
            assert b.server_stats()["running_bytes"] == 0  # the refused run holds no reservation
        finally:
            b.close()


def _lying(graph: Graph, node: int, meta: TensorMeta) -> Graph:
    nodes = list(graph.nodes)
    nodes[node] = dataclasses.replace(nodes[node], outputs=(meta,))
    return Graph(nodes, list(graph.outputs), graph.constants)


def test_a_graph_that_understates_an_output_fails_at_that_op():
    with serving("--memory-limit", "64M") as srv:
        b = RemoteBackend(srv.address, srv.token)
        try:
            graph = genie.trace(lambda x: (x.repeat(64, 1) * 2).sum(), torch.randn(4, 4))
            small = TensorMeta((4, 4), (4, 1), torch.float32)
            (rep,) = [n.id for n in graph.nodes if n.op == "aten.repeat.default"]
            with pytest.raises(genie.RemoteExecutionError, match="declares float32\\[4, 4\\]") as e:
                b.run(_lying(graph, rep, small), [torch.randn(4, 4)], fetch=[0], keep=[], constants={})
            assert e.value.op == "aten.repeat.default"
            # a factory whose size argument disagrees with its declared output never runs
            huge = Node(0, "aten.empty.memory_format", ([1 << 40],), {"dtype": torch.float32},
                        (TensorMeta((4,), (1,), torch.float32),))
            factory = Graph([huge, Node(1, "aten.sum.default", (Ref(0),), {},
                                        (TensorMeta((), (), torch.float32),))], [Ref(1)])
            with pytest.raises(genie.RemoteExecutionError, match="declares float32\\[4\\]"):
                b.run(factory, [], fetch=[0], keep=[], constants={})
            assert rss(srv) < 900 << 20
            check_served(b)
        finally:
            b.close()


def test_an_upload_bigger_than_the_memory_limit_is_refused_at_its_header():
    with serving("--memory-limit", "64M") as srv:
        s, p = handshake(srv)
        try:
            n = 1 << 28  # 1 GiB of float32: only the header goes out
            frame = p.send(Message("upload", {"id": 5, "digests": ["d"]}, [torch.empty(0)]))
            head = bytes(frame[0])
            hlen = PREFIX.unpack_from(head)[3]
            header = head[PREFIX.size:].replace(b'"bufs":[["float32",[0]]]',
                                                f'"bufs":[["float32",[{n}]]]'.encode())
            s.sendall(PREFIX.pack(MAGIC, VERSION, MESSAGES["upload"].code, len(header), n * 4) + header)
            assert hlen != len(header)
            err = reply(s, p)  # answered while the payload has not been sent at all
            assert err.kind == "error" and err["id"] == 5 and err["kind"] == "memory", err.fields
            assert "incoming frame of 1073741824 bytes" in err["message"]
        finally:
            s.close()
        b = RemoteBackend(srv.address, srv.token)
        try:
            big = torch.zeros(20 << 20)  # 80 MiB: the client's own upload is refused, its connection lives
            graph = genie.trace(lambda x: x + big, torch.zeros(1))
            with pytest.raises(genie.RemoteMemoryError, match="memory limit"):
                b.run(graph, [torch.zeros(1)], fetch=[0], keep=[], constants=graph.constants)
            check_served(b)
        finally:
            b.close()


# -- 6. stalled streams: they time out, and cannot take the worker threads -------------------------
def test_stalled_streamed_inputs_time_out_and_do_not_starve_an_honest_client():
    graph = genie.trace(lambda x: torch.relu(x) + 1, torch.randn(4, 4))
    sched = genie.schedule(graph).stage_schedule().to_wire()
    run = Message("run", {"id": 7, "graph": "bytes", "inputs": 0, "consts": [], "fetch": [0], "keep": [],
                          "stages": sched, "stream": [0]}, [graph.to_bytes()])
    with serving("--stream-timeout", "4") as srv:
        stalled = []
        try:
            for _ in range(45):  # more than trio's 40 default worker threads
                s, p = handshake(srv)
                s.sendall(p.send_bytes(dataclasses.replace(run)))  # the input never follows
                stalled.append((s, p))
            time.sleep(1)  # their runs are waiting in worker threads
            b = RemoteBackend(srv.address, srv.token)
            done: list[float] = []
            t0 = time.monotonic()
            honest = threading.Thread(target=lambda: (check_served(b), done.append(time.monotonic() - t0)),
                                      daemon=True)
            honest.start()
            honest.join(60)
            assert done, "the honest client's run hung behind stalled streams"
            for s, p in stalled[:3]:
                err = reply(s, p, timeout=30)
                assert err.kind == "error" and err["id"] == 7, err.fields
                assert "did not arrive within 4 s" in err["message"] and "--stream-timeout" in err["message"]
            check_served(b)
            b.close()
        finally:
            for s, _ in stalled:
                s.close()


# -- 7. big messages: refused before the expensive work, and never on the event loop ---------------
class Pinger(threading.Thread):
    """Pings ``srv`` on its own connection; ``worst`` is the slowest answer seen."""

    def __init__(self, srv) -> None:
        super().__init__(daemon=True)
        self.s, self.p = handshake(srv)
        self.worst = 0.0
        self.count = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            self.s.sendall(self.p.send_bytes(Message("ping", {"id": self.count + 1})))
            assert reply(self.s, self.p).kind == "pong"
            self.worst = max(self.worst, time.monotonic() - t0)
            self.count += 1
            time.sleep(0.01)

    def __enter__(self) -> Pinger:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(10)
        self.s.close()


def _many_nodes(n: int) -> bytes:
    rec = b'["aten.add.Tensor",[{"r":[0,0]},1],{},[[[4],[1],"float32",0]],false,[1],[],"",null]'
    head = b'{"nodes":[["genie.input",[0],{},[[[4],[1],"float32",0]],false,[0],[],"",null],' + \
        b",".join([rec] * n) + b'],"outputs":[[0,0]]}'
    return b"GNG1" + len(head).to_bytes(4, "little") + head


def test_a_huge_graph_is_refused_without_stalling_other_clients(server):
    assert LIMITS["max_nodes"].default < 1_000_000
    with Pinger(server) as pinger:
        s, p = handshake(server)
        try:
            msg = Message("run", {"id": 3, "graph": "bytes", "inputs": 0, "consts": [], "fetch": [0],
                                  "keep": []}, [_many_nodes(1_000_000)])
            s.sendall(p.send_bytes(msg))
            err = reply(s, p, timeout=60)
            assert err.kind == "error" and err["kind"] == "protocol" and "--max-nodes" in err["message"]
            time.sleep(0.2)
        finally:
            s.close()
    assert pinger.count > 5 and pinger.worst < 1.0, (pinger.count, pinger.worst)


def test_a_frame_with_too_many_buffers_is_refused_without_stalling_other_clients(server):
    with Pinger(server) as pinger:
        s, p = handshake(server)
        try:
            n = 300_000  # zero-byte descriptors: a 3.6 MB header, within --max-header
            head = b'{"id":1,"digests":[],"bufs":[' + b",".join([b'["bytes",0]'] * n) + b"]}"
            s.sendall(PREFIX.pack(MAGIC, VERSION, MESSAGES["upload"].code, len(head), 0) + head)
            p.receive_data(read_until_closed(s))
            err = p.next_event()
            assert err.kind == "error" and err["kind"] == "protocol" and "--max-buffers" in err["message"]
            time.sleep(0.2)
        finally:
            s.close()
    assert pinger.count > 5 and pinger.worst < 1.0, (pinger.count, pinger.worst)


# -- 8. idle connections: closed by the server; the runtime reconnects on its next call -------------
def test_an_idle_connection_is_closed_and_the_client_reconnects():
    with serving("--idle-timeout", "1") as srv:
        s, _ = handshake(srv)
        try:
            t0 = time.monotonic()
            read_until_closed(s, limit=20)  # the server hangs up on its own
            assert 0.5 < time.monotonic() - t0 < 15
        finally:
            s.close()
        b = RemoteBackend(srv.address, srv.token)
        try:
            check_served(b)
            assert b.stats.extra["connections"] == 1
            time.sleep(3)  # idle: the server closes this connection too
            check_served(b)  # transparently, on a new connection
            assert b.stats.extra["connections"] == 2
            assert b.server_stats()["open_connections"] == 1
        finally:
            b.close()


def test_connections_past_the_limit_are_refused_at_their_hello():
    with serving("--max-connections", "2") as srv:
        held = [handshake(srv)[0] for _ in range(2)]
        try:
            extra = raw_connection(srv)
            p = Protocol("client")
            extra.sendall(p.send_bytes(Message("hello", {"version": VERSION, "token": srv.token})))
            refusal = reply(extra, p)  # said why, then closed; no worker ever saw it
            assert refusal.kind == "error" and "--max-connections" in refusal["message"], refusal.fields
            assert read_until_closed(extra) == b""
            extra.close()
        finally:
            for s in held:
                s.close()
        b = RemoteBackend(srv.address, srv.token)
        try:
            deadline = time.monotonic() + 10
            while True:  # the two closed ones are let go as the server notices
                try:
                    check_served(b)
                    break
                except genie.ConnectionLostError:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
        finally:
            b.close()


def test_every_limit_has_a_flag_and_a_default():
    from genie.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for lim in LIMITS.values():
        if lim.flag is not None:
            assert lim.flag in text
    args = build_parser().parse_args(["serve", "--max-nodes", "7", "--idle-timeout", "0.5",
                                      "--memory-limit", "1G"])
    assert (args.max_nodes, args.idle_timeout, args.memory_limit) == (7, 0.5, 1 << 30)


def test_kept_values_keep_their_connection_alive(monkeypatch):
    """A client holding values on the server pings while idle, so the idle timeout never frees them."""
    from genie.runtime import _connection

    monkeypatch.setattr(_connection, "KEEPALIVE", 0.3)
    with serving("--idle-timeout", "1") as srv, using(RemoteBackend(srv.address, srv.token)) as b:
        x = torch.randn(4, 4)
        y = x.to("remote_accelerator:0") * 2
        torch.testing.assert_close(y.cpu(), x * 2)  # y stays on the server, under a handle
        time.sleep(3)  # three idle timeouts
        torch.testing.assert_close((y + 1).cpu(), x * 2 + 1)
        assert b.stats.extra["connections"] == 1
