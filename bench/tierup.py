"""Does tiering up stall other clients? A client's step latency before and while another client's
program compiles (Inductor, in the server's compile child), against one ``genie serve``.

    python bench/tierup.py

Client A (this process) replays a small compiled step (a 4-layer MLP, ``genie.compile``) and reads
its result each step. After A's own program has tiered up, A measures its steps for a few seconds
(before), then starts client B (another process, same tenant, so the same worker) decoding a small
Llama with ``genie.compile``, whose step the server then compiles, and measures again until that
compile ends (during). Writes bench/results/tierup.json.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import _server_fixtures as fx  # noqa: E402
from _common import report  # noqa: E402

import genie  # noqa: E402

DEV = "remote_accelerator:0"
CLIENT_B = """
import os, sys, torch, genie
sys.path.insert(0, {bench!r})
from decode import llama_small
torch.set_num_threads(1)
genie.connect({address!r}, token={token!r})
from transformers import StaticCache
with torch.no_grad():
    model = llama_small(2).to("remote_accelerator:0")
    model.forward = genie.compile(model.forward)
    ids = torch.randint(3, 1000, (1, 8))
    model.generate(ids.to("remote_accelerator:0"), max_new_tokens=8, do_sample=False,
                   cache_implementation="static")
print("done", flush=True)
"""


def _compiling() -> bool:
    return any(p["compiling"] for p in genie.stats(server=True).get("server.tiers", []))


def _steps(step, until) -> list[float]:
    out = []
    while not until():
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=float, default=5.0, help="seconds measured before B starts")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as cache, \
            fx.serving("--compile", "inductor", "--compile-cache", cache) as s:
        genie.connect(s.address, token=s.token)
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU())
                                    for _ in range(4)]).eval().to(DEV)
        fwd = genie.compile(mlp.forward)
        x = torch.randn(8, 256).to(DEV)

        def step() -> None:
            with torch.no_grad():
                fwd(x).sum().cpu()

        for _ in range(5):
            step()
        while _compiling():  # A's own program tiers up first
            time.sleep(0.2)
        t_end = time.monotonic() + args.before
        before = _steps(step, lambda: time.monotonic() > t_end)
        b = subprocess.Popen([sys.executable, "-c", CLIENT_B.format(bench=str(HERE), address=s.address,
                                                                    token=s.token)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        while not _compiling() and b.poll() is None and time.monotonic() - t0 < 120:
            step()  # B records and runs; its compile starts after its step's third run
        started = time.monotonic()
        during = _steps(step, lambda: not _compiling())
        compile_s = time.monotonic() - started
        b.wait(timeout=600)
        tiers = genie.stats(server=True).get("server.tiers", [])

    def q(xs: list[float], p: float) -> float:
        return statistics.quantiles(xs, n=100)[p - 1] if len(xs) >= 2 else (xs[0] if xs else float("nan"))

    rows = [{"phase": name, "steps": len(xs), "p50 ms": q(xs, 50), "p90 ms": q(xs, 90), "p99 ms": q(xs, 99)}
            for name, xs in (("before", before), ("during compile", during))]
    report("tierup", rows, {"compile_seconds": compile_s, "tiers": tiers,
                            "p99_moved_ms": rows[1]["p99 ms"] - rows[0]["p99 ms"]})
    moved = rows[1]["p99 ms"] - rows[0]["p99 ms"]
    print(f"p99 moved by {moved:+.2f} ms while a {compile_s:.0f} s compile ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
