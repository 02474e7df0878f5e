"""Greedy decode with a static cache: local eager, device mode and ``genie.compile``, side by side,
against a server per compile tier (``genie serve --compile off|codegen|inductor``). Each remote row's
"vs eager" divides by an eager decode run right before it.

    python bench/decode.py                # GPT-2-small (12 layers, d=768) and a small Llama, 8 steps
    python bench/decode.py --steps 16 --tiers codegen,inductor

Per tier, each model decodes to warm the server up (its programs tier up: the generated code at
their second run, Inductor in the background after their third, one compile at a time) until no
program is compiling or waiting to (the time to tier up), then decodes again, measured.
``first token ms`` is the prefill call plus the first token's fetch in the measured decode.

Random weights (no hub download); tokens must equal eager. Each step is one ``forward`` plus the
token's fetch. Per step (medians) the client's own time (outside ``Backend.run``) and the time
inside ``Backend.run`` (send, server compute, receive) are split by wrapping the backend's ``run``
from here, so the product carries no timing code; the server's own counters (asked between steps)
give its compute, read (graph decode, template fill, checks) and send time per step. Also: the client
time of one compiled call for 2 and 12 layers (GPT-2-small width), and the tiny-op round trip next
to a raw two-process ping-pong (bench/roundtrip.py).
Writes bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

import genie  # noqa: E402
from genie.runtime import backend  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import _server_fixtures as fx  # noqa: E402  # a real `genie serve` child, as the tests start it

DEV = "remote_accelerator:0"
_INSIDE: list[float] = []  # seconds spent in Backend.run since the last reset


def _timed_backend() -> None:
    b = backend()

    def timed(fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _INSIDE.append(time.perf_counter() - t0)
        return call

    b.run, b.submit = timed(b.run), timed(b.submit)  # a submit (a replay) only hands the run over


def gpt2_small(n_layer: int = 12):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, initializer_range=0.2)).eval()


def llama_small(n_layer: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=n_layer,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                      initializer_range=0.2, bos_token_id=1, eos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def decode(model, ids: torch.Tensor, steps: int, dev: str, resident_input: bool = False) -> dict:
    """``resident_input``: run the new token's ``[:, None]`` before the call (outside its time), so
    that the call's client time is the compiled call's alone."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    t_first = time.perf_counter()
    out = model(ids.to(dev), past_key_values=cache, use_cache=True)
    int(out.logits[:, -1].argmax(-1).cpu())
    first_ms = (time.perf_counter() - t_first) * 1e3
    tokens, call_s, call_inside, fetch_s, sent, trips, call_cpu = [], [], [], [], [], [], []
    server: dict[str, list[float]] = {"compute_seconds": [], "read_seconds": [], "send_seconds": []}
    ask = getattr(backend(), "server_stats", None) if dev != "cpu" else None
    WARM = 2  # steps 0 and 1 record (and step 0 uploads the weights): the steady state is after
    ss0: dict | None = None
    for i in range(steps):
        if i == WARM:  # the steady state's wall time and server counters, asked once: a stats round
            ss0 = ask() if ask is not None else None  # trip between steps would hide their waits
            t_steady = time.perf_counter()
        s0 = genie.stats() if dev != "cpu" else None
        t0 = time.perf_counter()
        tok = out.logits[:, -1].argmax(-1)
        tokens.append(int(tok.cpu()))
        cur = tok[:, None]
        if resident_input:
            cur.cpu()
        t1 = time.perf_counter()
        pos = torch.tensor([ids.shape[1] + i]).to(dev)
        _INSIDE.clear()
        c0 = time.thread_time()
        out = model(cur, past_key_values=cache, use_cache=True, cache_position=pos)
        call_cpu.append(time.thread_time() - c0)
        t2 = time.perf_counter()
        call_inside.append(sum(_INSIDE))
        call_s.append(t2 - t1)
        fetch_s.append(t1 - t0)
        if s0 is not None:  # the first step also uploads the weights (the prefill's flush)
            s1 = genie.stats()
            sent.append(s1["bytes_sent"] - s0["bytes_sent"])
            trips.append(s1["round_trips"] - s0["round_trips"])
    tokens.append(int(out.logits[:, -1].argmax(-1).cpu()))  # the last step's token: its wait counts
    steady = max(1, steps - WARM)
    step_ms = (time.perf_counter() - t_steady) * 1e3 / steady
    if ss0 is not None:
        ss1 = ask()
        for k, xs in server.items():
            xs.append((ss1.get(k, 0.0) - ss0.get(k, 0.0)) / steady)
    # medians of the steady state (steps 0 and 1 record, and step 0 uploads the weights)
    med = lambda xs: statistics.median(xs[WARM:] if len(xs) > WARM + 1 else xs) * 1e3  # noqa: E731
    return {"tokens": tokens, "first_ms": first_ms, "step_ms": step_ms, "call_ms": med(call_s),
            "fetch_ms": med(fetch_s),
            "call_client_ms": med([c - r for c, r in zip(call_s, call_inside, strict=True)]),
            "call_run_ms": med(call_inside), "call_cpu_ms": med(call_cpu),
            **{f"server_{k.removesuffix('_seconds')}_ms": xs[0] * 1e3 if xs else 0.0
               for k, xs in server.items()},
            "sent_per_step": int(statistics.median(sent[2:])) if len(sent) > 2 else 0,
            "round_trips_per_step": statistics.median(trips[2:]) if len(trips) > 2 else 0}


def _server_tiers() -> list[dict]:
    return genie.stats(server=True).get("server.tiers", [])


def one_model(name: str, make, steps: int, tier: str, eager: dict) -> list[dict]:
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (1, 8))
    rows = []
    for mode in ("device", "compile"):
        model = make().to(DEV)
        if mode == "compile":
            model.forward = genie.compile(model.forward)
        t0 = time.perf_counter()
        for _ in range(20):  # warm-up decodes until the server's programs have tiered up
            decode(model, ids, steps, DEV)
            while any(p["compiling"] for p in _server_tiers()):
                time.sleep(0.5)
            if not any(p["waiting"] for p in _server_tiers()):  # (a compile starts at a program's run)
                break
        tier_up_s = time.perf_counter() - t0
        eager = decode(make(), ids, steps, "cpu")  # again, right beside it: the machine is shared
        r = decode(model, ids, steps, DEV)
        if r["tokens"] != eager["tokens"]:
            raise SystemExit(f"decode: {name} {tier} {mode} tokens differ from eager: {r['tokens']} vs "
                             f"{eager['tokens']}")
        tiers = [p["tier"] for p in _server_tiers() if p["runs"] >= steps]
        rows.append(_row(name, tier, mode, r, eager, tier_up_s, max(tiers, default=0)))
    return rows


def _row(name: str, tier: str, mode: str, r: dict, eager: dict, tier_up_s: float = 0.0,
         reached: int | str = "-") -> dict:
    remote = mode != "eager"
    return {
        "model": name, "server": tier, "mode": mode, "tier reached": reached, "tokens/s": 1e3 / r["step_ms"],
        "step ms": r["step_ms"], "vs eager": r["step_ms"] / eager["step_ms"], "first token ms": r["first_ms"],
        "tier-up s": tier_up_s, "fwd ms": r["call_ms"],
        "fwd client ms": r["call_client_ms"] if remote else r["call_ms"],
        "fwd in run ms": r.get("call_run_ms", 0.0) if remote else 0.0, "fwd cpu ms": r["call_cpu_ms"],
        "fetch ms": r["fetch_ms"], "srv compute ms": r.get("server_compute_ms", 0.0),
        "srv read ms": r.get("server_read_ms", 0.0), "srv send ms": r.get("server_send_ms", 0.0),
        "sent B/step": r["sent_per_step"], "round trips/step": r["round_trips_per_step"]}


def compiled_client_ms(n_layer: int, steps: int) -> dict:
    """Wall time outside ``Backend.run``, and the calling thread's CPU time (the send included; a
    loaded machine's waits not), of one compiled call whose inputs are resident already."""
    model = gpt2_small(n_layer).to(DEV)
    model.forward = genie.compile(model.forward)
    torch.manual_seed(1)
    r = decode(model, torch.randint(3, 1000, (1, 8)), steps, DEV, resident_input=True)
    return {"wall_outside_run_ms": r["call_client_ms"], "thread_cpu_ms": r["call_cpu_ms"]}


def round_trip(n: int) -> dict:
    try:
        import roundtrip
    except ImportError:
        return {}
    raw = roundtrip.RawPingPong()
    try:
        raw_ns = [raw.once() for _ in range(n)]
    finally:
        raw.close()
    genie_ns = roundtrip.genie_loop(n)
    raw_us, genie_us = statistics.median(raw_ns) / 1e3, statistics.median(genie_ns) / 1e3
    return {"raw_median_us": raw_us, "genie_median_us": genie_us, "ratio": genie_us / raw_us}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--tiers", default="off,codegen,inductor",
                        help="the servers' --compile modes, in order (default: all three)")
    parser.add_argument("--models", default="gpt2-small,llama-small")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    makers = {"gpt2-small": gpt2_small, "llama-small": llama_small}
    models = [(n, makers[n]) for n in args.models.split(",")]
    eager = {}
    rows = []
    for name, make in models:
        torch.manual_seed(1)
        ids = torch.randint(3, 1000, (1, 8))  # as one_model draws them
        eager[name] = decode(make(), ids, args.steps, "cpu")
        rows.append(_row(name, "-", "eager", eager[name], eager[name]))
    client: dict = {}
    rt: dict = {}
    with tempfile.TemporaryDirectory() as cache:
        for tier in args.tiers.split(","):
            with fx.serving("--compile", tier, "--compile-cache", cache) as server:
                genie.connect(server.address, token=server.token)
                _timed_backend()
                for name, make in models:
                    rows += one_model(name, make, args.steps, tier, eager[name])
                if tier == args.tiers.split(",")[-1]:  # the client's costs, at the best tier asked for
                    client = {f"{n} layers": compiled_client_ms(n, args.steps) for n in (2, 12)}
                    rt = round_trip(args.round_trips)
    report("decode", rows, {"compiled_call_client_ms": client, "round_trip": rt,
                            "steps": args.steps, "stats": genie.stats()})
    for what in ("wall_outside_run_ms", "thread_cpu_ms"):
        two, twelve = client["2 layers"][what], client["12 layers"][what]
        print(f"compiled call, client {what}: 2 layers {two:.3f}, 12 layers {twelve:.3f}, "
              f"12/2 = {twelve / two:.2f}")
    if rt:
        print(f"tiny-op round trip: genie {rt['genie_median_us']:.0f} us, raw {rt['raw_median_us']:.0f} us "
              f"(median), ratio {rt['ratio']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
