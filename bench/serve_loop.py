"""Concurrent generation sessions on one event loop: Genie (genie.call + fetch) against local eager.

    python bench/serve_loop.py                 # small GPT-2 (4 layers, d=256), 1/4/8/16 sessions, 32 tokens
    python bench/serve_loop.py --quick         # tiny GPT-2, 1/4 sessions, 8 tokens
    python bench/serve_loop.py --loop asyncio --sessions 1,8 --tokens 64

Drives ``Generator.stream`` of examples/llm_server.py (the HTTP server's whole inference path) with
no HTTP in between, so what is measured is the model path and the event loop, not the web stack.
Each mode runs on a fresh model, its startup heap frozen as the example's server freezes it
(``freeze_startup_heap``: a full garbage collection of ~380,000 objects otherwise holds the GIL
for ~200 ms), in this order:

- ``cold``: 8 sessions on a model no request has used yet: Genie uploads its weights and records
  every step (prefill per prompt bucket, decode) while the sessions run. Nothing is warmed up.
- ``warm``: 1/4/8/16 sessions with the same prompt lengths (8 to 11 tokens).
- ``new lengths``: 8 sessions whose prompts (20 to 27 tokens) fall in buckets never seen, so their
  prefills record while the others decode.

Per row: tokens/s over all sessions; time to first token and the per-token latency (between a
session's successive tokens; p50 and p90 over every session); the event loop's lag (a ticker sleeps
1 ms and records how late it woke: what any other request on this loop waits), worst and p99, and
WHERE the worst happened: a garbage collection (which holds the GIL, in any thread), else the
phase (``llm_server.PHASE``: new request, prefill, decode, fetch) of the loop's task steps that ran
while the ticker was late, else "off the loop" (the GIL held by another thread, the OS running
something else); the longest single task step and its phase; bytes sent
and received per token (``genie.stats()``, prefill included). Separately, the bytes and round trips
of one decode step alone. Tokens must equal eager's. Writes bench/results/serve_loop.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import statistics
import sys
import threading
import time
from pathlib import Path

import anyio
import sniffio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

import genie  # noqa: E402

_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "llm_server.py"
_spec = importlib.util.spec_from_file_location("llm_server_example", _EXAMPLE)
llm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llm)

STALL_SESSIONS = 8  # the cold and new-lengths rows
SHORT, LONG = 8, 20  # prompt lengths: SHORT..SHORT+3 (cold, warm), LONG..LONG+7 (new lengths)


def _prompt(i: int, vocab: int, first: int, spread: int) -> list[int]:
    """Session ``i``'s prompt, of length ``first + i % spread``."""
    g = torch.Generator().manual_seed(i)
    return torch.randint(0, vocab, (first + i % spread,), generator=g).tolist()


# -- where the loop spent its time ------------------------------------------------------------------
class Steps:
    """Every step of every task on the loop: (start, end, label), where the label is the phase the
    task was in (``llm_server.PHASE``) or, for a task that is not a session, its name. Trio reports
    steps to an instrument; asyncio runs each as a ``Handle``, timed by wrapping ``Handle._run``."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float, str]] = []
        self.collections: list[tuple[float, float, str]] = []  # the garbage collector's, any thread
        self._started: dict[object, tuple[float, str]] = {}
        self._gc_start = 0.0

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            where = threading.current_thread().name
            self.collections.append((self._gc_start, time.perf_counter(),
                                     f"gc gen {info['generation']} ({where})"))

    def __enter__(self) -> Steps:
        gc.callbacks.append(self._gc)
        if sniffio.current_async_library() == "asyncio":
            self._run = asyncio.events.Handle._run
            steps = self

            def timed(handle: asyncio.events.Handle) -> None:
                before = steps._label(handle._context, handle)
                t0 = time.perf_counter()
                steps._run(handle)
                steps._close(t0, before, steps._label(handle._context, handle))

            asyncio.events.Handle._run = timed
        else:
            import trio

            trio.lowlevel.add_instrument(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._gc)
        if sniffio.current_async_library() == "asyncio":
            asyncio.events.Handle._run = self._run
        else:
            import trio

            trio.lowlevel.remove_instrument(self)

    # trio's Instrument interface
    def before_task_step(self, task) -> None:
        self._started[task] = (time.perf_counter(), self._label(task.context, task))

    def after_task_step(self, task) -> None:
        t0, before = self._started.pop(task, (time.perf_counter(), ""))
        self._close(t0, before, self._label(task.context, task))

    def _close(self, t0: float, before: str, after: str) -> None:
        self.spans.append((t0, time.perf_counter(), before if before == after else f"{before} -> {after}"))

    @staticmethod
    def _label(context, owner) -> str:
        phase = context.get(llm.PHASE, "") if context is not None else ""
        if phase:
            return phase
        task = getattr(getattr(owner, "_callback", None), "__self__", owner)  # asyncio: the Task
        name = getattr(task, "name", None) or (task.get_name() if hasattr(task, "get_name") else "")
        return f"task {name.strip('<>').rsplit('.', 1)[-1]}" if name else "loop callback"

    def worst(self) -> tuple[float, str]:
        """The longest step: (seconds, label)."""
        if not self.spans:
            return 0.0, "-"
        t0, t1, label = max(self.spans, key=lambda s: s[1] - s[0])
        return t1 - t0, label

    def during(self, start: float, end: float) -> str:
        """What took most of ``[start, end]``: a garbage collection (it holds the GIL, whichever
        thread runs it), else the label of the loop's steps, else "off the loop" (another thread
        held the GIL, or the OS ran something else)."""
        for spans in (self.collections, self.spans):
            overlap: dict[str, float] = {}
            for t0, t1, label in spans:
                o = min(t1, end) - max(t0, start)
                if o > 0:
                    overlap[label] = overlap.get(label, 0.0) + o
            if overlap and sum(overlap.values()) >= 0.5 * (end - start):
                return max(overlap, key=overlap.__getitem__)
        return "off the loop (GIL, OS)"


# -- one measured run ---------------------------------------------------------------------------------
async def _session(gen, prompt: list[int], n: int, out: dict) -> None:
    t0 = time.perf_counter()
    times, tokens = [], []
    async for t in gen.stream(prompt, n):
        times.append(time.perf_counter())
        tokens.append(t)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    out.update(tokens=tokens, ttft=times[0] - t0, gaps=gaps)


async def _run(gen, sessions: int, n: int, first: int, spread: int) -> dict:
    results = [{} for _ in range(sessions)]
    lags: list[tuple[float, float, float]] = []  # (lag, slept from, woke at)
    done = anyio.Event()

    async def ticker(*, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while not done.is_set():
            t = time.perf_counter()
            await anyio.sleep(0.001)
            woke = time.perf_counter()
            lags.append((woke - t - 0.001, t + 0.001, woke))

    s0 = genie.stats() if gen.device != "cpu" else None
    with Steps() as steps:
        t0 = time.perf_counter()
        async with anyio.create_task_group() as outer:
            await outer.start(ticker)  # ticking before the first session starts
            async with anyio.create_task_group() as tg:
                for i in range(sessions):
                    tg.start_soon(_session, gen, _prompt(i, gen.vocab, first, spread), n, results[i])
            wall = time.perf_counter() - t0
            done.set()
    total = sessions * n
    gaps = sorted(g for r in results for g in r["gaps"])
    q = statistics.quantiles(gaps, n=10, method="inclusive") if len(gaps) > 1 else gaps * 9
    worst_lag, late_from, woke = max(lags)
    step, step_label = steps.worst()
    row = {"tokens/s": total / wall, "ttft p50 ms": statistics.median(r["ttft"] for r in results) * 1e3,
           "tok p50 ms": statistics.median(gaps) * 1e3 if gaps else 0.0, "tok p90 ms": q[8] * 1e3,
           "max lag ms": worst_lag * 1e3, "lag p99 ms": _p99([x[0] for x in lags]) * 1e3,
           "max lag in": steps.during(late_from, woke),
           "worst step ms": step * 1e3, "worst step in": step_label,
           "tokens": [r["tokens"] for r in results]}
    if s0 is not None:
        s1 = genie.stats()
        row["sent B/tok"] = (s1["bytes_sent"] - s0["bytes_sent"]) // total
        row["recv B/tok"] = (s1["bytes_received"] - s0["bytes_received"]) // total
    return row


def _p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[98] if len(xs) > 1 else max(xs)


async def _decode_step_cost(gen, n: int) -> dict:
    """Bytes and round trips between two tokens of one session alone (medians after the first two):
    one decode step's forward and its token's fetch."""
    keys = ("bytes_sent", "bytes_received", "round_trips")
    snaps = []
    async for _ in gen.stream(_prompt(0, gen.vocab, SHORT, 4), n):
        snaps.append(genie.stats())
    steps = [{k: b[k] - a[k] for k in keys} for a, b in zip(snaps[1:], snaps[2:], strict=False)]
    return {k: statistics.median(s[k] for s in steps) for k in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 and 4 sessions, 8 tokens")
    parser.add_argument("--sessions", default=None, help="comma-separated counts (default 1,4,8,16)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per session (default 32)")
    parser.add_argument("--model", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--loop", choices=("trio", "asyncio"), default="trio")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size = "tiny" if args.quick else "small"
    counts = [int(c) for c in (args.sessions or ("1,4" if args.quick else "1,4,8,16")).split(",")]
    n = args.tokens or (8 if args.quick else 32)
    plan = [("cold", STALL_SESSIONS, SHORT, 4), *(("warm", c, SHORT, 4) for c in counts),
            ("new lengths", STALL_SESSIONS, LONG, STALL_SESSIONS)]

    rows, eager_tokens = [], {}
    for mode in ("eager", "genie"):
        gen = llm.Generator(llm.build_model(args.model, size), device="cpu" if mode == "eager" else llm.DEV)
        llm.freeze_startup_heap()  # as the example does once it has started
        for run, c, first, spread in plan:
            r = anyio.run(_run, gen, c, n, first, spread, backend=args.loop)
            tokens = r.pop("tokens")
            if mode == "eager":
                eager_tokens[run, c] = tokens
            elif tokens != eager_tokens[run, c]:
                raise SystemExit(f"serve: genie's tokens differ from eager's ({run}, {c} sessions)")
            rows.append({"mode": mode, "run": run, "sessions": c, **r})
        if mode == "genie":
            step = anyio.run(_decode_step_cost, gen, max(n, 6), backend=args.loop)
            records = {"prefill": [gen.prefill.records, gen.prefill.replays],
                       "decode": [gen.decode.records, gen.decode.replays]}
    for r in rows:
        r.setdefault("sent B/tok", 0)
        r.setdefault("recv B/tok", 0)
    report("serve_loop", rows, {"model": f"{args.model}-{size}", "tokens_per_session": n, "loop": args.loop,
                           "decode_step": step, "recordings_and_replays": records, "stats": genie.stats()})
    print(f"one decode step: {step['bytes_sent']:.0f} B sent, {step['bytes_received']:.0f} B received, "
          f"{step['round_trips']:.2f} round trips")
    print(f"genie.compile recordings / replays: prefill {records['prefill']}, decode {records['decode']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
