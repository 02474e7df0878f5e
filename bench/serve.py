"""Concurrent generation sessions on one event loop: Genie (compile + fetch) against local eager.

    python bench/serve.py                 # small GPT-2 (4 layers, d=256), 1/4/8/16 sessions, 32 tokens
    python bench/serve.py --quick         # tiny GPT-2, 1/4 sessions, 8 tokens
    python bench/serve.py --loop asyncio --sessions 1,8 --tokens 64

Drives ``Generator.stream`` of examples/llm_server.py (the HTTP server's whole inference path) with
no HTTP in between, so what is measured is the model path and the event loop, not the web stack.
Per row: tokens/s over all sessions; time to first token and the per-token latency (between a
session's successive tokens; p50 and p90 over every session); the event loop's lag (a ticker sleeps
1 ms and records how late it woke: what any other request on this loop waits), worst and p99 (the
p99 is less at the mercy of one descheduling on a busy machine); bytes sent and received per token
(``genie.stats()``, prefill included). Separately, the bytes and round trips of one decode step
alone (``genie.stats()`` between two tokens of one session).
Tokens must equal eager's. Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import anyio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

import genie  # noqa: E402

_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "llm_server.py"
_spec = importlib.util.spec_from_file_location("llm_server_example", _EXAMPLE)
llm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llm)


def _prompt(i: int, vocab: int) -> list[int]:
    """Session ``i``'s prompt: lengths 8..11, so requests differ but share a cache bucket."""
    g = torch.Generator().manual_seed(i)
    return torch.randint(0, vocab, (8 + i % 4,), generator=g).tolist()


async def _session(gen, prompt: list[int], n: int, out: dict) -> None:
    t0 = time.perf_counter()
    times, tokens = [], []
    async for t in gen.stream(prompt, n):
        times.append(time.perf_counter())
        tokens.append(t)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    out.update(tokens=tokens, ttft=times[0] - t0, gaps=gaps)


async def _run(gen, sessions: int, n: int) -> dict:
    results = [{} for _ in range(sessions)]
    lags: list[float] = []
    done = anyio.Event()

    async def ticker(*, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while not done.is_set():
            t = time.perf_counter()
            await anyio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    s0 = genie.stats() if gen.device != "cpu" else None
    t0 = time.perf_counter()
    async with anyio.create_task_group() as outer:
        await outer.start(ticker)  # ticking before the first session starts
        async with anyio.create_task_group() as tg:
            for i in range(sessions):
                tg.start_soon(_session, gen, _prompt(i, gen.vocab), n, results[i])
        wall = time.perf_counter() - t0
        done.set()
    total = sessions * n
    gaps = sorted(g for r in results for g in r["gaps"])
    q = statistics.quantiles(gaps, n=10, method="inclusive") if len(gaps) > 1 else gaps * 9
    row = {"tokens/s": total / wall, "ttft p50 ms": statistics.median(r["ttft"] for r in results) * 1e3,
           "tok p50 ms": statistics.median(gaps) * 1e3 if gaps else 0.0, "tok p90 ms": q[8] * 1e3,
           "max loop lag ms": max(lags) * 1e3, "lag p99 ms": _p99(lags) * 1e3,
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
    async for _ in gen.stream(_prompt(0, gen.vocab), n):
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

    rows, eager_tokens = [], {}
    for mode in ("eager", "genie"):
        gen = llm.Generator(llm.build_model(args.model, size), device="cpu" if mode == "eager" else llm.DEV)
        anyio.run(_run, gen, 2, n, backend=args.loop)  # weights up, the step recorded: not measured
        for c in counts:
            r = anyio.run(_run, gen, c, n, backend=args.loop)
            tokens = r.pop("tokens")
            if mode == "eager":
                eager_tokens[c] = tokens
            elif tokens != eager_tokens[c]:
                raise SystemExit(f"serve: genie's tokens differ from eager's at {c} sessions")
            rows.append({"mode": mode, "sessions": c, **r})
        if mode == "genie":
            step = anyio.run(_decode_step_cost, gen, max(n, 6), backend=args.loop)
    for r in rows:
        r.setdefault("sent B/tok", 0)
        r.setdefault("recv B/tok", 0)
    report("serve", rows, {"model": f"{args.model}-{size}", "tokens_per_session": n, "loop": args.loop,
                           "decode_step": step, "stats": genie.stats()})
    print(f"one decode step: {step['bytes_sent']:.0f} B sent, {step['bytes_received']:.0f} B received, "
          f"{step['round_trips']:.2f} round trips")
    return 0


if __name__ == "__main__":
    sys.exit(main())
