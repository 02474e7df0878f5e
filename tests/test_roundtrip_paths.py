"""The fast paths of a small round trip stay right: tiny runs on the server's event loop, small
frames written at once by their poster, corrections in the run header, the sync bridge woken
straight from the connection's reader. Each against a real ``genie serve``."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
import trio
from _server_fixtures import check_served, serving, stats_delta, using

import genie
from genie.graph import Graph
from genie.runtime._remote import RemoteBackend

BIG = 1024  # a (BIG, BIG) float32 matmul chain: far past the inline bound, and seconds of work


def _slow_graph(steps: int = 160) -> Graph:
    def chain(x: torch.Tensor) -> torch.Tensor:
        for _ in range(steps):
            x = torch.tanh(x @ x)
        return x.sum()

    return genie.trace(chain, torch.randn(BIG, BIG))


def _tiny_graph() -> Graph:
    return genie.trace(lambda x: x * 2 + 1, torch.randn(4, 4))


def test_tiny_runs_inline_give_right_answers_and_big_ones_use_a_thread():
    with serving() as srv, using(RemoteBackend(srv.address, srv.token)) as b:
        before = b.server_stats()
        x = torch.arange(4.0, device="remote_accelerator:0")
        for i in range(40):  # a new int each call: the template path with header corrections
            assert (x + i).cpu().tolist() == [i, i + 1.0, i + 2.0, i + 3.0]
        mid = b.server_stats()
        d = stats_delta(before, mid)
        assert d["runs_inline"] >= 40 and d["template_hits"] >= 38
        big = torch.randn(256, 256)  # 256 KiB in and out: past the inline bound
        y = (torch.ones(256, 256, device="remote_accelerator:0") * big.to("remote_accelerator:0")).cpu()
        torch.testing.assert_close(y, big)
        assert stats_delta(mid, b.server_stats())["runs_inline"] == 0
        check_served(b)


def test_a_big_run_leaves_the_event_loop_to_other_clients():
    with serving() as srv:
        slow, fast = RemoteBackend(srv.address, srv.token), RemoteBackend(srv.address, srv.token)
        try:
            graph, x = _slow_graph(), torch.randn(BIG, BIG) / BIG
            fast.connect()
            done = threading.Event()
            out: list = []

            def run_slow() -> None:
                out.append(slow.run(graph, [x], fetch=[0], keep=[], constants=graph.constants))
                done.set()

            t = threading.Thread(target=run_slow, daemon=True)
            t.start()
            trio.run(trio.sleep, 0.3)  # generous: the big run has reached its worker thread
            tiny = _tiny_graph()
            answers = 0
            while not done.is_set() and answers < 20:  # the other connection is served meanwhile
                z = torch.randn(4, 4)
                (got,) = fast.run(tiny, [z], fetch=[0], keep=[], constants={}).fetched
                torch.testing.assert_close(got, z * 2 + 1)
                answers += 1
            assert answers == 20 and not done.is_set(), "tiny runs waited for the big one"
            t.join(120)
            assert out and out[0].fetched[0].isfinite()
        finally:
            slow.close()
            fast.close()


async def test_a_tiny_run_queued_behind_a_big_one_can_be_cancelled():
    with serving("--workers", "1") as srv:  # one compute slot, as on a GPU: the tiny run waits for it
        b = RemoteBackend(srv.address, srv.token)
        try:
            graph, x = _slow_graph(), torch.randn(BIG, BIG) / BIG
            tiny = _tiny_graph()
            before = await trio.to_thread.run_sync(b.server_stats)
            cancelled = trio.CancelScope()

            async def tiny_run() -> None:
                with cancelled:
                    await b.run_async(tiny, [torch.randn(4, 4)], fetch=[0], keep=[], constants={})
                    raise AssertionError("the cancelled run returned")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: b.run_async(graph, [x], fetch=[0], keep=[], constants={}))
                await trio.sleep(0.2)
                nursery.start_soon(tiny_run)  # waits on the server for the big run's compute slot
                await trio.sleep(0.2)
                cancelled.cancel()
            assert cancelled.cancelled_caught
            after = await trio.to_thread.run_sync(b.server_stats)
            d = stats_delta(before, after)
            assert d["cancelled"] == 1 and d["runs"] == 1 and d.get("runs_inline", 0) == 0
            z = torch.randn(4, 4)  # the connection carries on, inline again
            (got,) = (await b.run_async(tiny, [z], fetch=[0], keep=[], constants={})).fetched
            torch.testing.assert_close(got, z * 2 + 1)
        finally:
            b.close()


def test_an_inline_run_still_reserves_its_peak_under_the_memory_limit():
    limit = 8 << 20
    with serving("--memory-limit", str(limit)) as srv:
        b = RemoteBackend(srv.address, srv.token)
        try:
            # keep values filling all but ~24 KiB of the limit (a run's keep is counted beside its
            # reservation until it ends, so each takes at most half of what is left)
            kept, room = [], limit
            while room > 36 << 10:
                n = (room // 2 - 64) // 4 if room > 72 << 10 else (room - (20 << 10)) // 8
                fill = genie.trace(lambda x, n=n: x.expand(n).clone(), torch.zeros(()))
                kept += b.run(fill, [torch.zeros(())], fetch=[], keep=[0], constants={}).handles
                room -= 4 * n
            # 64 KiB of values in all (tiny), all live at once before the add: more than is left
            tiny = genie.trace(lambda x: x * 2 + x * 3, torch.randn(4096))
            before = b.server_stats()
            assert limit - before["resident_bytes"] < 60 << 10
            z = torch.randn(4096)
            with pytest.raises(genie.RemoteMemoryError, match="memory limit"):
                b.run(tiny, [z], fetch=[0], keep=[], constants={})
            after = b.server_stats()
            assert stats_delta(before, after).get("runs_inline", 0) == 0 and after["running_bytes"] == 0
            for h in kept:
                b.free(h)
            for _ in range(50):  # the free goes out batched; the run after it fits
                try:
                    (got,) = b.run(tiny, [z], fetch=[0], keep=[], constants={}).fetched
                    break
                except genie.RemoteMemoryError:
                    trio.run(trio.sleep, 0.05)
            torch.testing.assert_close(got, z * 5)
            assert stats_delta(after, b.server_stats())["runs_inline"] >= 1
        finally:
            b.close()


def test_corrections_in_the_header_and_in_buffers_fill_the_same_graphs():
    """A small graph's corrections ride in the header; a big one's, when many ints move, in two
    vectors. Both fill the template to the graph that was recorded."""
    with serving() as srv, using(RemoteBackend(srv.address, srv.token)) as b:
        for width in (3, 100):  # a few ints move: in the header; over SMALL_FIX move: two vectors
            x = torch.zeros(1, device="remote_accelerator:0")
            for step in range(1, 6):
                acc = x
                for _ in range(width):
                    acc = acc + step * step  # not linear in the step: every int breaks the prediction
                assert acc.cpu().item() == width * step * step
        assert b.stats.template_hits >= 6  # steps 3-5 of each width (step 2 first reads x resident)


def test_a_run_that_fails_before_its_template_is_registered_leaves_no_stale_slot():
    """The server refuses the graph (an unknown op) before registering its template slot: the
    client forgets the slot, so running the same graph again is the same clear error, not a
    protocol error for an unknown slot."""
    with serving() as srv:
        b = RemoteBackend(srv.address, srv.token)
        try:
            graph = _tiny_graph()
            nodes = [dataclasses.replace(n, op="aten.definitely_not_an_op.default")
                     if n.op.startswith("aten.mul") else n for n in graph.nodes]
            bad = Graph(nodes, list(graph.outputs), graph.constants)
            for _ in range(2):
                with pytest.raises(genie.UnsupportedOpError, match="definitely_not_an_op"):
                    b.run(bad, [torch.randn(4, 4)], fetch=[0], keep=[], constants={})
            check_served(b)
        finally:
            b.close()
