"""Many clients at once: trio tasks multiplexed on one connection, and many connections."""

from __future__ import annotations

import _server_fixtures as fx
import torch
import trio

import genie
from genie.runtime._remote import RemoteBackend

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
    assert remote.stats.plan_cache_hits >= CLIENTS  # one registration, the rest fill its template


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
