"""Continuous batching: many sessions' runs of one program as one batched run, on real servers.

Unit tests build batched programs in this process (``_batched``); the rest run real ``genie serve``
processes. ``--batch-wait`` makes runs that are posted together wait for each other, so that a
test knows they batch; the tokens and values must equal each session's own eager run either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import _server_fixtures as fx
import torch
import trio
from _models import llm_server_example

import genie
from genie.graph import Template, split
from genie.server import Interpreter, mark_program
from genie.server._batched import batched_program, bucket, sources, stack_rows, unbatchable

CPU = torch.device("cpu")
DEV = "remote_accelerator:0"
WAIT = ("--batch-wait", "0.3")  # runs posted together batch together


def _batch_stats(b) -> dict:
    return {k: v for k, v in b.server_stats().items() if "batch" in k}


def _until(b, key: str, at_least: int, rounds, limit: int = 8) -> None:
    """Call ``rounds()`` until the server's counter ``key`` reaches ``at_least`` (a batch size is
    traced in the background after the first batch that wants it; a check runs before trust)."""
    for _ in range(limit):
        if b.server_stats()[key] >= at_least:
            return
        rounds()
    raise AssertionError(f"{key} never reached {at_least}: {_batch_stats(b)}")


# -- the batched program, in this process ----------------------------------------------------------------
def _program(fn, *inputs):
    g = genie.trace(fn, *inputs)
    parts = split(g)
    mark_program(g, parts.digest, Template(parts.skeleton).program_ints(parts.ints, g))
    return g


def test_each_row_of_a_batched_program_equals_its_session_alone():
    torch.manual_seed(0)
    w = torch.randn(8, 8)

    def f(x, i):  # a reduction over dim 0, an index, a softmax: vmap keeps every row to itself
        h = (x @ w).relu()
        return h.sum(0).softmax(-1), h.index_select(0, i), h.mean()

    xs = [torch.randn(5, 8) for _ in range(3)]
    idx = [torch.tensor([i, 4 - i]) for i in range(3)]
    g = _program(f, xs[0], idx[0])
    assert unbatchable(g) is None
    own, shared = sources(g)  # w (256 bytes) is small: each session's own, stacked like an input
    assert [n.op for n in own] == ["genie.const"] and shared == []
    weights = [g.constants[n.args[0]] for n in own]
    b = batched_program(g, [xs[0], idx[0]], weights, [], 4, CPU)
    assert not isinstance(b, str), b
    assert b.size == 4 and bucket(4, 32) == 4
    stacked = [stack_rows(xs, 4), stack_rows(idx, 4), *(stack_rows([t] * 3, 4) for t in weights)]
    outs = Interpreter(b.graph, device=CPU, constants={**g.constants, **b.constants}).run(stacked)
    for r in range(3):
        want = Interpreter(g, device=CPU, constants=g.constants).run([xs[r], idx[r]])
        for got, w_ in zip(outs, want, strict=True):
            torch.testing.assert_close(got[r], w_, rtol=1e-5, atol=1e-6)


def test_random_ops_and_written_constants_never_batch():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    assert "random" in unbatchable(_program(lambda x: torch.nn.functional.dropout(x, 0.5, True), x))
    bn = torch.nn.BatchNorm1d(8).train()  # train mode: its running stats (constants) are written
    assert "constant" in unbatchable(_program(bn, x))
    assert unbatchable(_program(torch.nn.BatchNorm1d(8).eval(), x)) is None
    assert [bucket(n, 32) for n in (2, 3, 5, 7, 9, 17, 40)] == [2, 3, 6, 8, 12, 24, 32]
    assert bucket(9, 8) == 8


# -- sessions with state on a server ------------------------------------------------------------------------
def _step(x, pos, state):
    """A KV-cache write: row ``pos`` of ``state`` (resident on the server) becomes ``x`` (host
    tensors: their bytes travel with each replay)."""
    x, pos = x.to(state.device), pos.to(state.device)
    state.index_copy_(0, pos, x * 2.0)
    return state.sum(0).softmax(-1)


def _sessions(n: int):
    torch.manual_seed(1)
    xs = [torch.randn(1, 4) for _ in range(n)]
    poss = [torch.tensor([i % 6]) for i in range(n)]
    return xs, poss


def _eager(xs, poss, bad=()):
    outs, states = [], []
    for i, (x, p) in enumerate(zip(xs, poss, strict=True)):
        s = torch.zeros(6, 4)
        if i in bad:
            outs.append(None)
        else:
            outs.append(_step(x, p, s))
        states.append(s)
    return outs, states


def _run_batch(f, xs, poss, states):
    """Post every session's step at once (replays do not wait), then read each result."""
    outs = [f(x, p, s) for x, p, s in zip(xs, poss, states, strict=True)]
    got = []
    for o in outs:
        try:
            got.append(o.cpu())
        except genie.GenieError as e:
            got.append(e)
    return got


def test_sessions_batch_and_a_bad_index_or_nan_changes_no_other_session():
    with fx.serving(*WAIT) as srv, fx.using(fx.RemoteBackend(srv.address, srv.token)) as b:
        f = genie.compile(_step)
        n = 5
        f(torch.zeros(1, 4), torch.tensor([0]), torch.zeros(6, 4, device=DEV)).cpu()  # recorded

        def well() -> None:
            xs, poss = _sessions(n)
            _run_batch(f, xs, poss, [torch.zeros(6, 4, device=DEV) for _ in range(n)])

        _until(b, "batches", 1, well)  # traced, checked, trusted
        # round 1: session 1 writes past its cache, session 3 sends NaN; rounds 0 and 2: all well
        for rnd in range(3):
            xs, poss = _sessions(n)
            bad = {1} if rnd == 1 else set()
            if rnd == 1:
                poss[1] = torch.tensor([99])
                xs[3] = torch.full((1, 4), float("nan"))
            states = [torch.zeros(6, 4, device=DEV) for _ in range(n)]
            got = _run_batch(f, xs, poss, states)
            want, want_states = _eager(xs, poss, bad)
            for i in range(n):
                if i in bad:
                    assert isinstance(got[i], genie.GenieError) and "index" in str(got[i]), got[i]
                else:
                    torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-6, equal_nan=True)
                # every session's state holds its own write, once; the failed one's holds none
                torch.testing.assert_close(states[i].cpu(), want_states[i], equal_nan=True)
        stats = _batch_stats(b)
        assert stats["batches"] >= 1 and stats["batch_size_max"] >= 4, stats
        assert stats["batch_fallbacks"] >= 1 and stats["batch_rejected"] == 0, stats


def test_max_batch_caps_each_batch_and_every_run_is_served_in_order():
    """Five sessions, batches of at most two: the queue is first in, first out, so none starves."""
    with fx.serving("--max-batch", "2", *WAIT) as srv, \
            fx.using(fx.RemoteBackend(srv.address, srv.token)) as b:
        f = genie.compile(_step)
        f(torch.zeros(1, 4), torch.tensor([0]), torch.zeros(6, 4, device=DEV)).cpu()

        def five() -> None:
            xs, poss = _sessions(5)
            states = [torch.zeros(6, 4, device=DEV) for _ in range(5)]
            got = _run_batch(f, xs, poss, states)
            want, want_states = _eager(xs, poss)
            for i in range(5):
                torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(states[i].cpu(), want_states[i])

        five()
        _until(b, "batches", 2, five)
        stats = _batch_stats(b)
        assert stats["batch_size_max"] == 2 and stats["max_batch"] == 2, stats


async def test_a_cancelled_run_leaves_its_batch_and_changes_nothing():
    w = torch.randn(16, 16)
    g = genie.trace(lambda x: (x @ w).softmax(-1), torch.randn(4, 16))
    with fx.serving("--batch-wait", "1.0") as srv:
        b = fx.RemoteBackend(srv.address, srv.token)
        try:
            async def one(x: torch.Tensor, out: list) -> None:
                r = await b.run_async(g, [x], fetch=[0], keep=[], constants=g.constants)
                out.append(r.fetched[0])

            xs = [torch.randn(4, 16) for _ in range(4)]
            for _ in range(6):  # until a trusted batch ran (its size traced, then checked)
                if (await trio.to_thread.run_sync(b.server_stats))["batches"]:
                    break
                got: list[list] = [[] for _ in xs]
                async with trio.open_nursery() as nursery:
                    for x, out in zip(xs[1:], got[1:], strict=True):
                        nursery.start_soon(one, x, out)
                    with trio.move_on_after(0.3):  # cancelled while its batch waits to start
                        await one(xs[0], got[0])
                assert got[0] == []
                for x, out in zip(xs[1:], got[1:], strict=True):
                    torch.testing.assert_close(out[0], (x @ w).softmax(-1), rtol=1e-5, atol=1e-6)
            stats = await trio.to_thread.run_sync(b.server_stats)
            assert stats["batch_size_max"] == 3 and stats["batches"] >= 1 and stats["cancelled"] >= 1, stats
        finally:
            b.close()


# -- LLM sessions -------------------------------------------------------------------------------------------
async def _generate(gen, jobs, delays=None) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in jobs]

    async def one(i: int) -> None:
        if delays:
            await trio.sleep(delays[i])
        async for t in gen.stream(*jobs[i]):
            out[i].append(t)

    async with trio.open_nursery() as nursery:
        for i in range(len(jobs)):
            nursery.start_soon(one, i)
    return out


JOBS = [([5, 7, 9, 11], 14), ([1], 6), ([3, 3, 3], 18), ([100, 2, 64, 17, 8, 99], 9), ([42] * 10, 16),
        ([7, 8], 3)]


def test_sessions_that_join_and_leave_mid_stream_across_two_models_equal_eager():
    """Sessions of different prompt lengths start at different times and stop after different
    numbers of tokens, on two models at once (one server, two batch keys)."""
    llm = llm_server_example()
    models = {name: llm.build_model(name) for name in ("gpt2", "llama")}
    want: dict = {}
    with fx.serving("--batch-wait", "0.005") as srv, fx.using(fx.RemoteBackend(srv.address, srv.token)) as b:
        gens = {name: llm.Generator(llm.build_model(name)) for name in models}
        eager = {name: llm.Generator(m, device="cpu") for name, m in models.items()}
        delays = [0.0, 0.05, 0.0, 0.2, 0.1, 0.3]

        async def both() -> dict:
            res: dict = {}
            async with trio.open_nursery() as nursery:
                for name, gen in gens.items():
                    async def run(name=name, gen=gen) -> None:
                        res[name] = await _generate(gen, JOBS, delays)
                    nursery.start_soon(run)
            return res

        for name in models:
            want[name] = trio.run(_generate, eager[name], JOBS)

        def check() -> None:  # every round (the first traces and checks) equals eager
            got = trio.run(both)
            for name in models:
                assert got[name] == want[name], name

        check()
        _until(b, "batches", 4, check)
        stats = _batch_stats(b)
        assert stats["batches"] >= 4 and stats["batch_size_max"] >= 3, stats
        keys = [p for p in stats["batch_programs"] if p["trusted"]]
        assert len(keys) >= 2, stats  # each model's decode step batches, apart from the other's
        assert stats["batch_rejected"] == 0, stats


def test_max_batch_1_runs_each_alone():
    llm = llm_server_example()
    with fx.serving("--max-batch", "1") as srv, fx.using(fx.RemoteBackend(srv.address, srv.token)) as b:
        gen = llm.Generator(llm.build_model("gpt2"))
        got = trio.run(_generate, gen, JOBS[:3])
        want = trio.run(_generate, llm.Generator(llm.build_model("gpt2"), device="cpu"), JOBS[:3])
        assert got == want
        stats = b.server_stats()
        assert stats["batches"] == 0 and stats["max_batch"] == 1


_CLIENT = textwrap.dedent("""
    import sys, json, trio, torch
    sys.path.insert(0, {tests!r})
    from _models import llm_server_example
    llm = llm_server_example()
    gen = llm.Generator(llm.build_model("llama"))
    async def main():
        await gen.warmup(lengths=(32,))
        print("ready", flush=True)
        while await trio.to_thread.run_sync(sys.stdin.readline):  # a round per line, until EOF
            tokens = [t async for t in gen.stream(json.loads(sys.argv[1]), int(sys.argv[2]))]
            print(json.dumps(tokens), flush=True)
    trio.run(main)
""")


def test_separate_client_processes_batch_together_and_equal_eager(tmp_path: Path):
    """Three users, each a process with its own connection, one tenant: their decode steps batch."""
    script = tmp_path / "client.py"
    script.write_text(_CLIENT.format(tests=str(Path(__file__).parent)))
    llm = llm_server_example()
    jobs = [([5, 7, 9, 11], 12), ([3, 3], 12), ([100, 2, 64, 17, 8, 99, 1], 12)]
    model = llm.build_model("llama")
    want = [trio.run(_generate, llm.Generator(model, device="cpu"), [j])[0] for j in jobs]
    with fx.serving("--batch-wait", "0.02") as srv, fx.using(fx.RemoteBackend(srv.address, srv.token)) as b:
        env = {**os.environ, "GENIE_SERVER": srv.address, "GENIE_TOKEN": srv.token, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, str(script), json.dumps(p), str(n)], env=env, cwd=tmp_path,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for p, n in jobs]
        try:
            for p in procs:
                assert p.stdout.readline().strip() == "ready"

            def together() -> None:  # a round: every user starts at once; each gets eager's tokens
                for p in procs:
                    p.stdin.write("go\n")
                    p.stdin.flush()
                assert [json.loads(p.stdout.readline()) for p in procs] == want

            together()
            _until(b, "batches", 1, together)
            stats = _batch_stats(b)
        finally:
            for p in procs:
                p.kill()
    assert stats["batch_size_max"] >= 2 and stats["batched_runs"] >= 2, stats


def test_cli_refuses_bad_batch_flags():
    for flags, why in ((["--max-batch", "0"], "positive"), (["--max-batch", "5000"], "at most"),
                       (["--batch-wait", "-1"], "between"), (["--batch-wait", "nan"], "between")):
        r = subprocess.run([sys.executable, "-m", "genie", "serve", *flags], capture_output=True, text=True,
                           timeout=60, cwd="/")
        assert r.returncode == 2 and why in r.stderr, (flags, r.stderr)


def test_verbose_logs_batch_sizes():
    with fx.serving("--verbose", *WAIT) as srv, fx.using(fx.RemoteBackend(srv.address, srv.token)) as b:
        f = genie.compile(_step)
        f(torch.zeros(1, 4), torch.tensor([0]), torch.zeros(6, 4, device=DEV)).cpu()
        def three() -> None:
            xs, poss = _sessions(3)
            _run_batch(f, xs, poss, [torch.zeros(6, 4, device=DEV) for _ in range(3)])

        _until(b, "batches", 1, three)
        out = srv.stderr_tail()
    assert "batch of 3 runs (size 3" in out, out
