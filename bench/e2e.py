"""End to end: a GPT-2-small-sized model through ``genie serve`` on loopback (CPU) against local eager.

    python bench/e2e.py                      # GPT-2 small shape (12 layers, 768 wide), random weights
    python bench/e2e.py --layers 2 --seq 64  # quicker

Reported:
- forward: logits of a (1, seq) prompt fetched to the CPU; remote / local latency (target <= 1.10);
- decode: one token per step with the KV cache (``past_key_values``) kept on the server and the token
  fetched by ``.item()``: bytes and latency per step with residency on, and in the naive mode
  (``GENIE_RESIDENCY=0``: every step re-sends every weight and the whole graph);
- the same two "in process" (genie's LocalBackend: capture + interpreter, no wire, no server), which
  separates what the wire costs from what recording and replaying cost.
Both server and client use one CPU thread.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import torch  # noqa: E402
from _common import report  # noqa: E402
from _server_fixtures import serving, using  # noqa: E402

import genie  # noqa: E402
from genie.runtime import LocalBackend  # noqa: E402
from genie.runtime._remote import RemoteBackend  # noqa: E402

DEV = "remote_accelerator:0"
warnings.filterwarnings("ignore", message=".*past_key_values.*")


def gpt2(layers: int, width: int, heads: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def timed(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``reps`` calls after ``warmup`` ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode(model: torch.nn.Module, prompt: torch.Tensor, steps: int, remote: bool,
           stats: bool | None = None) -> tuple[list, list]:
    """Greedy decode; per step: (seconds, genie.stats() delta when ``stats``)."""
    stats = remote if stats is None else stats
    cur = prompt.to(DEV) if remote else prompt
    past, per_step, tokens = None, [], []
    for _ in range(steps):
        before = genie.stats() if stats else {}
        t0 = time.perf_counter()
        out = model(cur, past_key_values=past, use_cache=True)
        past = out.past_key_values
        tok = out.logits[0, -1].argmax().item()
        dt = time.perf_counter() - t0
        after = genie.stats() if stats else {}
        per_step.append((dt, {k: after[k] - before[k] for k in ("bytes_sent", "bytes_received")}
                         if stats else {}))
        tokens.append(tok)
        cur = torch.tensor([[tok]])
        cur = cur.to(DEV) if remote else cur
    return tokens, per_step


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="decode steps (resident)")
    p.add_argument("--naive-steps", type=int, default=3, help="decode steps in naive mode")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = gpt2(args.layers, args.width, args.heads)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    prompt = torch.randint(0, model.config.vocab_size, (1, args.seq))
    rows = []
    with serving() as srv:
        # -- forward ------------------------------------------------------------------------------
        local_model = copy.deepcopy(model)
        local = timed(lambda: local_model(prompt).logits, args.reps)
        with using(RemoteBackend(srv.address, srv.token)) as backend:
            remote_model = copy.deepcopy(model).to(DEV)
            t0 = time.perf_counter()
            first = remote_model(prompt.to(DEV)).logits.cpu()  # uploads the weights, registers the plan
            first_s = time.perf_counter() - t0
            torch.testing.assert_close(first, local_model(prompt).logits, atol=1e-4, rtol=1e-4)
            s0 = genie.stats()
            remote = timed(lambda: remote_model(prompt.to(DEV)).logits.cpu(), args.reps, warmup=1)
            s1 = genie.stats()
            n = args.reps + 1
            rows.append({"case": f"forward (1, {args.seq})", "local ms": local * 1e3,
                         "remote ms": remote * 1e3, "remote/local": remote / local,
                         "sent/run B": (s1["bytes_sent"] - s0["bytes_sent"]) // n,
                         "received/run B": (s1["bytes_received"] - s0["bytes_received"]) // n})
            # -- decode, resident -----------------------------------------------------------------
            want, local_steps = decode(local_model, prompt[:, :8], args.steps, remote=False)
            server0 = backend.server_stats()
            got, steps = decode(remote_model, prompt[:, :8], args.steps, remote=True)
            server1 = backend.server_stats()
            server_ms = {k: (server1[k] - server0[k]) / args.steps * 1e3
                         for k in ("read_seconds", "compute_seconds")}
            assert got == want, (got, want)
            hot = steps[2:] or steps[-1:]  # from the third step on: template hits
            resident = {"ms": statistics.median(d for d, _ in hot) * 1e3,
                        "sent": statistics.median(s["bytes_sent"] for _, s in hot),
                        "received": statistics.median(s["bytes_received"] for _, s in hot)}
            hits = genie.stats()["template_hits"]
        local_step = statistics.median(d for d, _ in local_steps[2:] or local_steps) * 1e3
        rows.append({"case": "decode step, resident", "local ms": local_step, "remote ms": resident["ms"],
                     "remote/local": resident["ms"] / local_step, "sent/run B": int(resident["sent"]),
                     "received/run B": int(resident["received"])})
        # -- the same, in process (no wire): what capture + interpreter cost by themselves ---------
        with using(LocalBackend("cpu")):
            inproc_model = copy.deepcopy(model).to(DEV)
            inproc = timed(lambda: inproc_model(prompt.to(DEV)).logits.cpu(), args.reps, warmup=1)
            _, steps = decode(inproc_model, prompt[:, :8], args.steps, remote=True, stats=False)
        inproc_step = statistics.median(d for d, _ in steps[2:] or steps) * 1e3
        rows.append({"case": "forward, in process", "local ms": local * 1e3, "remote ms": inproc * 1e3,
                     "remote/local": inproc / local, "sent/run B": 0, "received/run B": 0})
        rows.append({"case": "decode step, in process", "local ms": local_step, "remote ms": inproc_step,
                     "remote/local": inproc_step / local_step, "sent/run B": 0, "received/run B": 0})
        # -- decode, naive ------------------------------------------------------------------------
        with using(RemoteBackend(srv.address, srv.token, residency=False)):
            naive_model = copy.deepcopy(model).to(DEV)
            got, steps = decode(naive_model, prompt[:, :8], args.naive_steps, remote=True)
            assert got == want[: args.naive_steps]
        hot = steps[1:] or steps
        naive = {"ms": statistics.median(d for d, _ in hot) * 1e3,
                 "sent": statistics.median(s["bytes_sent"] for _, s in hot),
                 "received": statistics.median(s["bytes_received"] for _, s in hot)}
        rows.append({"case": "decode step, naive", "local ms": local_step, "remote ms": naive["ms"],
                     "remote/local": naive["ms"] / local_step, "sent/run B": int(naive["sent"]),
                     "received/run B": int(naive["received"])})
    report("e2e", rows, {
        "model": f"GPT-2 {args.layers} layers x {args.width}, random weights, {weight_bytes} weight bytes",
        "first remote forward s (upload + plan)": first_s,
        "forward target": "remote/local <= 1.10",
        "decode bytes/step target": "<= 4096 on a plan-cache hit",
        "resident decode bytes/step": resident["sent"] + resident["received"],
        "naive decode bytes/step": naive["sent"] + naive["received"],
        "template hits (resident client)": hits,
        "server ms per resident decode step (read = template fill, compute = interpreter)": server_ms,
    })


if __name__ == "__main__":
    main()
