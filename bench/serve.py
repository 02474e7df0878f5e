"""Many users on one server: N client processes generating at once, batched by the server or not.

    python bench/serve.py                      # Llama and GPT-2 (small), 1/4/8/16 sessions, 32 tokens
    python bench/serve.py --quick              # Llama (small), 1/8 sessions, 16 tokens
    python bench/serve.py --model gpt2 --sessions 1,8 --tokens 64

Each session is a process of its own, with its own connection, as separate users are: it builds the
model (``examples/llm_server.py``'s seeded small configs), moves it to ``remote_accelerator:0`` (the
weights upload once per server: clients share them by content digest), records its steps once
(``Generator.warmup``), then generates in rounds that all sessions start at once: unmeasured ones
until the server has traced and checked every batch size they form (its counters stop moving), then
the measured one. Each greedy-generates its prompt (5 to 12 tokens: the prompts and so the
positions differ) and reports when each token came.

Two servers, each ``genie serve --workers 1`` with one thread (the targets' setting): the default,
which batches the ready decode steps of one program across sessions, and ``--max-batch 1``, which
runs each alone. Beside them, local eager PyTorch in this process: one session (batch 1), and
``generate`` with a static cache at batch N (what a local GPU owner who batches by hand gets).

Per row: aggregate tokens/s (every session's tokens over the time from the start line to the last
token), time to first token (p50 over sessions), per-token latency p50 and p90 (the gaps between a
session's tokens), mean batch size (the server's counters); each ratio is against one session on
the same server. Where the CPU goes, per token: the clients' (mean over sessions), the server
worker's (from /proc), its compute (``compute_seconds``: runs and batches), and the share of batch
time spent copying sessions' values in and written rows out. Every session's tokens must equal its
eager greedy run. Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import report  # noqa: E402

EXAMPLE = HERE.parent / "examples" / "llm_server.py"
MAX_WARM_ROUNDS = 8  # unmeasured rounds at most, while the server traces and checks batch sizes
WARM_COUNTERS = ("batch_traces", "batch_checks", "batch_trace_failures", "tier1_programs")


def _example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("llm_server_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prompt(i: int, vocab: int) -> list[int]:
    """Session ``i``'s prompt: 5 to 12 tokens, so sessions sit at different positions."""
    g = torch.Generator().manual_seed(100 + i)
    return torch.randint(1, vocab, (5 + i % 8,), generator=g).tolist()


# -- one session: a process of its own ----------------------------------------------------------------
def client(model: str, index: int, tokens: int) -> None:
    """Warm up, then on each ``warm`` line generate and say ``ready`` again; on ``last``, generate
    and print the result as JSON."""
    import trio

    torch.set_num_threads(1)
    llm = _example()
    gen = llm.Generator(llm.build_model(model, "small"))
    p = prompt(index, gen.vocab)

    async def run() -> dict:
        await gen.warmup(prompts=(llm.PROMPT_BUCKET, 2 * llm.PROMPT_BUCKET), lengths=(llm.BUCKET,))
        while True:
            print("ready", flush=True)
            last = (await trio.to_thread.run_sync(sys.stdin.readline)).strip() == "last"
            t0, cpu = time.time(), time.process_time()
            times, out = [], []
            async for t in gen.stream(p, tokens):
                times.append(time.time())
                out.append(t)
            if last:
                return {"start": t0, "times": times, "tokens": out, "cpu": time.process_time() - cpu}

    print(json.dumps(trio.run(run)), flush=True)


def sessions(model: str, n: int, tokens: int, server: str, warm: Callable[[], object],
             measure: Callable[[], None]) -> list[dict]:
    """``n`` client processes against ``server``, started together: rounds until ``warm()`` (the
    server's trace and check counters) stops changing (every batch size these sessions form is
    traced and trusted), then one measured round (``measure()`` is called as it starts); its
    results."""
    env = {**os.environ, "GENIE_SERVER": server, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--client", model, str(i), str(tokens)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(n)]

    def ready() -> None:
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise SystemExit(f"serve: a client failed ({line!r})")

    def start(word: str) -> None:
        for p in procs:
            p.stdin.write(word + "\n")
            p.stdin.flush()

    try:
        ready()  # weights uploaded, steps recorded
        before = warm()
        for _ in range(MAX_WARM_ROUNDS):
            start("warm")
            ready()
            now = warm()
            if now == before:
                break
            before = now
        measure()
        start("last")
        results = []
        for p in procs:
            line = p.stdout.readline()
            if not line:
                raise SystemExit("serve: a client died")
            results.append(json.loads(line))
            p.wait(timeout=60)
        return results
    finally:
        for p in procs:
            p.kill()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def row(results: list[dict], tokens: int) -> dict:
    start = min(r["start"] for r in results)
    end = max(r["times"][-1] for r in results)
    gaps = sorted(b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False))
    q = statistics.quantiles(gaps, n=10, method="inclusive") if len(gaps) > 1 else gaps * 9
    return {"tokens/s": len(results) * tokens / (end - start),
            "ttft p50 ms": statistics.median(r["times"][0] - r["start"] for r in results) * 1e3,
            "tok p50 ms": statistics.median(gaps) * 1e3, "tok p90 ms": q[8] * 1e3}


# -- the servers ---------------------------------------------------------------------------------------
class Server:
    def __init__(self, *flags: str) -> None:
        import threading

        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "genie", "serve", "--host", "127.0.0.1", "--port", "0", "--workers", "1"]
        self.proc = subprocess.Popen([*cmd, *flags], env=env, stdout=subprocess.PIPE, text=True,
                                     cwd="/")  # (not the repo root: its kernels/ shadows the installed one)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            raise SystemExit(f"serve: genie serve did not start ({line!r})")
        self.address = line.split("listening on ")[1].strip()
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # (its later lines)

    def stats(self) -> dict:
        import genie

        genie.connect(self.address)
        return {k.removeprefix("server."): v for k, v in genie.stats(server=True).items()
                if k.startswith("server.")}

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# -- local eager ---------------------------------------------------------------------------------------
def eager_tokens(model_name: str, n: int, tokens: int) -> tuple[list[list[int]], float]:
    """Each of ``n`` sessions' greedy tokens, one session at a time as the example's eager Generator
    makes them, and one session's tokens/s."""
    import trio

    llm = _example()
    gen = llm.Generator(llm.build_model(model_name, "small"), device="cpu")

    async def one(i: int) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        out = [t async for t in gen.stream(prompt(i, gen.vocab), tokens)]
        return out, time.perf_counter() - t0

    runs = [trio.run(one, i) for i in range(n)]
    return [out for out, _ in runs], tokens / min(seconds for _, seconds in runs)


@torch.no_grad()
def eager_batch(model_name: str, n: int, tokens: int) -> float:
    """Local tokens/s of ``generate`` at batch ``n`` with a static cache (prompts left-padded)."""
    llm = _example()
    model = llm.build_model(model_name, "small")
    vocab = model.config.vocab_size
    width = max(len(prompt(i, vocab)) for i in range(n))
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i in range(n):
        p = prompt(i, vocab)
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kw = dict(attention_mask=mask, do_sample=False, cache_implementation="static", pad_token_id=0)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
    return n * tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--client":
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Llama only, 1 and 8 sessions, 16 tokens")
    parser.add_argument("--model", choices=("llama", "gpt2", "both"), default=None)
    parser.add_argument("--sessions", default=None, help="comma-separated counts (default 1,4,8,16)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per session (default 32)")
    parser.add_argument("--batch-wait", default="0", help="the batched server's --batch-wait (default 0)")
    parser.add_argument("--compile", choices=("off", "codegen", "inductor"), default="codegen",
                        help="the servers' highest tier (default codegen: Inductor's compiles of each "
                        "program "
                        "and batch size take minutes of this machine's CPU, inside the measurement)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = {"both": ["llama", "gpt2"], None: ["llama"] if args.quick else ["llama", "gpt2"]}.get(
        args.model, [args.model])
    counts = [int(c) for c in (args.sessions or ("1,8" if args.quick else "1,4,8,16")).split(",")]
    tokens = args.tokens or (16 if args.quick else 32)

    rows, notes = [], {"tokens_per_session": tokens,
                       "server": f"genie serve --workers 1 --compile {args.compile}, OMP_NUM_THREADS=1"}
    for model in models:
        want, single = eager_tokens(model, max(counts), tokens)
        base: dict[str, float] = {}
        for mode, flags in (("batched", ("--batch-wait", args.batch_wait)), ("alone", ("--max-batch", "1"))):
            server = Server("--compile", args.compile, *flags)
            try:
                for n in counts:
                    before: dict = {}

                    def measure(before: dict = before, server: Server = server) -> None:
                        before.update(server.stats())
                        before["cpu"] = cpu_seconds(before["pid"])

                    def warm(server: Server = server) -> tuple:
                        s = server.stats()
                        return tuple(s.get(k, 0) for k in WARM_COUNTERS)

                    results = sessions(model, n, tokens, server.address, warm, measure)
                    after = server.stats()
                    server_cpu = (cpu_seconds(after["pid"]) - before["cpu"]) / (n * tokens)
                    for i, r in enumerate(results):
                        if r["tokens"] != want[i]:
                            raise SystemExit(f"serve: {model} session {i} of {n} ({mode}): tokens differ "
                                             "from eager")
                    r = row(results, tokens)
                    base.setdefault(mode, r["tokens/s"])
                    batches = after["batches"] - before["batches"]
                    runs = after["batched_runs"] - before["batched_runs"]
                    rows.append({"model": model, "mode": mode, "sessions": n, **r,
                                 "x one session": r["tokens/s"] / base[mode],
                                 "mean batch": runs / batches if batches else 1.0,
                                 "client cpu ms/tok": statistics.mean(x["cpu"] for x in results) / tokens
                                 * 1e3,
                                 "server cpu ms/tok": server_cpu * 1e3,
                                 "compute ms/tok": (after["compute_seconds"] - before["compute_seconds"])
                                 / (n * tokens) * 1e3,
                                 "copy %": 100 * (after["batch_copy_seconds"] - before["batch_copy_seconds"])
                                 / max(1e-9, after["batch_seconds"] - before["batch_seconds"])})
            finally:
                server.close()
        for n in counts:  # batch 1 is the example's eager session; batch n, generate's
            local = eager_batch(model, n, tokens) if n > 1 else single
            rows.append({"model": model, "mode": "local eager", "sessions": n, "tokens/s": local,
                         "ttft p50 ms": 0.0, "tok p50 ms": 0.0, "tok p90 ms": 0.0,
                         "x one session": local / single, "mean batch": float(n), "client cpu ms/tok": 0.0,
                         "server cpu ms/tok": 0.0, "compute ms/tok": 0.0, "copy %": 0.0})
    report("serve", rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
