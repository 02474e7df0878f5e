"""Nothing that scales with what a client declares runs on the server's event loop: declared sizes
are checked when a graph is read (a negative output size once made 24 matmuls of 2048² look tiny,
and every connection froze for 11 s), and a run goes inline only when its sizes are proven from
the graph, never because the client said they were small."""

from __future__ import annotations

import dataclasses

import _server_fixtures as fx
import torch
from _server_fixtures import check_served, handshake, read_until_closed, reply, using

import genie
from genie.graph import Graph, TensorMeta
from genie.runtime._remote import RemoteBackend
from genie.transport import Message, Protocol

server = fx.server  # fixture, by name






def declaring(graph: Graph, node: int, meta: TensorMeta) -> Graph:
    """``graph`` with node ``node`` declaring ``meta`` as its output (a lie)."""
    nodes = list(graph.nodes)
    nodes[node] = dataclasses.replace(nodes[node], outputs=(meta,))
    return Graph(nodes, list(graph.outputs), graph.constants)


def run_frame(p: Protocol, graph: Graph, inputs: list, fetch: list[int]) -> bytes:
    fields = {"id": 7, "graph": "bytes", "inputs": len(inputs), "consts": [], "fetch": fetch, "keep": []}
    return p.send_bytes(Message("run", fields, [graph.to_bytes(), *inputs]))


def chain(x):
    for _ in range(6):
        x = x @ x
    return x.sum()


def test_a_negative_declared_size_is_refused_when_the_graph_is_read(server):
    x = torch.randn(256, 256) / 256
    graph = genie.trace(chain, x)
    first = next(n.id for n in graph.nodes if n.op.startswith("aten.mm"))
    lie = declaring(graph, first, TensorMeta((-1, 1 << 40), (1 << 40, 1), torch.float32))
    with using(RemoteBackend(server.address, server.token)) as b:
        before = b.server_stats()
        s, p = handshake(server)
        try:
            s.sendall(run_frame(p, lie, [x], [0]))
            p.receive_data(read_until_closed(s))
            err = p.next_event()
        finally:
            s.close()
        assert isinstance(err, Message) and err.kind == "error" and err["kind"] == "protocol", err
        assert f"node {first}" in err["message"] and "non-negative" in err["message"]
        after = b.server_stats()
        assert after.get("runs", 0) == before.get("runs", 0)  # nothing ran, inline or not
        assert after.get("runs_inline", 0) == before.get("runs_inline", 0)
        check_served(b)


def test_an_understated_broadcast_is_not_run_on_the_event_loop(server):
    """Two 16 KiB vectors whose sum the client declares as one element: the real sum is 64 MiB.
    Its size follows from the declared inputs (a pointwise op broadcasts them), so the server
    knows before running that the declaration is wrong: the run goes to a worker thread, and fails
    there at that op."""
    n = 4096
    graph = genie.trace(lambda a, c: (a + c).sum(), torch.randn(n, 1), torch.randn(1, n))
    add = next(n.id for n in graph.nodes if n.op.startswith("aten.add"))
    lie = declaring(graph, add, TensorMeta((1, 1), (1, 1), torch.float32))
    with using(RemoteBackend(server.address, server.token)) as b:
        before = b.server_stats()
        s, p = handshake(server)
        try:
            s.sendall(run_frame(p, lie, [torch.randn(n, 1), torch.randn(1, n)], [0]))
            err = reply(s, p)
        finally:
            s.close()
        assert err.kind == "error" and err["kind"] == "execution" and "declares" in err["message"], err.fields
        after = b.server_stats()
        assert after.get("runs_inline", 0) == before.get("runs_inline", 0)
        check_served(b)


def test_an_honest_tiny_run_still_runs_inline(server):
    with using(RemoteBackend(server.address, server.token)) as b:
        graph = genie.trace(lambda a, c: torch.relu(a + c) * 2, torch.randn(8, 1), torch.randn(1, 8))
        before = b.server_stats()
        for _ in range(3):
            a, c = torch.randn(8, 1), torch.randn(1, 8)
            (got,) = b.run(graph, [a, c], fetch=[0], keep=[], constants={}).fetched
            torch.testing.assert_close(got, torch.relu(a + c) * 2)
        assert b.server_stats()["runs_inline"] - before.get("runs_inline", 0) >= 2
