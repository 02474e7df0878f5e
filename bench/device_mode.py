"""Device mode with no code change: flush replays on and off, against local eager, side by side.

    python bench/device_mode.py               # GPT-2-small (12 layers) and a small Llama, 10 steps
    python bench/device_mode.py --steps 16 --layers 4

A manual static-cache greedy loop (one ``forward`` plus the token's fetch per step), as in
``bench/decode.py``, on a remote model with no ``genie.compile``: once with flush replays (the
default: a repeated flush reuses its plan and template split) and once with every flush planned in
full (``FLUSHES`` bypassed), alternating so that both see the same machine. Per mode, the median
step, the flush's client-side planning time (``FLUSHES.planned``), the step's ratio to eager, and
the replay counters. Tokens must equal eager in every mode. Also a ``generate`` (static cache) of
the small Llama in device mode against eager. Random weights, one thread. Writes
bench/results/device_mode.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

import genie  # noqa: E402
from genie.runtime import FLUSHES, planned_for_flush  # noqa: E402

DEV = "remote_accelerator:0"
_PLANNING: list[float] = []  # seconds in FLUSHES.planned since the last reset


def gpt2(n_layer: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, initializer_range=0.2)).eval()


def llama(n_layer: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=n_layer,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                      initializer_range=0.2, bos_token_id=1, eos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


class _Switch:
    """``FLUSHES.planned`` timed, and bypassed (every flush planned in full) while ``off``."""

    def __init__(self) -> None:
        self.off = False
        self.planned = FLUSHES.planned

        def planned(graph, fetch, keep, constants_of):
            t0 = time.perf_counter()
            try:
                if self.off:
                    return planned_for_flush(graph)
                return self.planned(graph, fetch, keep, constants_of)
            finally:
                _PLANNING.append(time.perf_counter() - t0)

        FLUSHES.planned = planned  # type: ignore[method-assign]


@torch.no_grad()
def loop(model, ids: torch.Tensor, steps: int, dev: str) -> tuple[list[int], float, float]:
    """Tokens, median step seconds and median planning seconds per step (steps 3 on)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    out = model(ids.to(dev), past_key_values=cache, use_cache=True)
    tokens, step_s, plan_s = [], [], []
    for i in range(steps):
        _PLANNING.clear()
        t0 = time.perf_counter()
        tok = out.logits[:, -1].argmax(-1)
        tokens.append(int(tok.cpu()))
        pos = torch.tensor([ids.shape[1] + i]).to(dev)
        out = model(tok[:, None], past_key_values=cache, use_cache=True, cache_position=pos)
        step_s.append(time.perf_counter() - t0)
        plan_s.append(sum(_PLANNING))
    return tokens, statistics.median(step_s[3:]), statistics.median(plan_s[3:])


def one_model(name: str, make, steps: int, switch: _Switch) -> list[dict]:
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (1, 8))
    want, eager_s, _ = loop(make(), ids, steps, "cpu")
    remote = make().to(DEV)
    rows = [{"model": name, "mode": "eager", "step ms": eager_s * 1e3, "vs eager": 1.0, "plan ms": 0.0,
             "replays": 0, "misses": 0}]
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    counts: dict[bool, tuple[int, int]] = {}
    for off in (False, True, False, True):  # alternate: both modes see the same machine
        switch.off = off
        before = genie.stats()
        got, step, plan = loop(remote, ids, steps, DEV)
        if got != want:
            raise SystemExit(f"device_mode: {name} ({'full planning' if off else 'replays'}) tokens "
                             f"differ from eager: {got} vs {want}")
        after = genie.stats()
        times[off].append((step, plan))
        counts[off] = (after["flush_replays"] - before["flush_replays"],
                       after["flush_replay_misses"] - before["flush_replay_misses"])
    switch.off = False
    for off in (False, True):
        step = min(s for s, _ in times[off])
        plan = min(p for _, p in times[off])
        rows.append({"model": name, "mode": "device, full planning" if off else "device, flush replays",
                     "step ms": step * 1e3, "vs eager": step / eager_s, "plan ms": plan * 1e3,
                     "replays": counts[off][0], "misses": counts[off][1]})
    return rows


@torch.no_grad()
def generate_row(steps: int) -> dict:
    torch.manual_seed(2)
    ids = torch.randint(3, 1000, (1, 8))
    kw = {"max_new_tokens": steps, "do_sample": False, "cache_implementation": "static"}
    model = llama(4)
    t0 = time.perf_counter()
    want = model.generate(ids, **kw).tolist()
    eager_s = time.perf_counter() - t0
    remote = llama(4).to(DEV)
    remote.generate(ids.to(DEV), **kw)  # warm: weights uploaded, programs learnt
    before = genie.stats()
    t0 = time.perf_counter()
    got = remote.generate(ids.to(DEV), **kw).tolist()
    device_s = time.perf_counter() - t0
    after = genie.stats()
    if got != want:
        raise SystemExit(f"device_mode: generate tokens differ from eager: {got} vs {want}")
    return {"model": "llama-4L generate", "mode": "device, flush replays", "step ms": device_s / steps * 1e3,
            "vs eager": device_s / eager_s, "plan ms": 0.0,
            "replays": after["flush_replays"] - before["flush_replays"],
            "misses": after["flush_replay_misses"] - before["flush_replay_misses"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=12, help="GPT-2's layers (Llama has 4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    switch = _Switch()
    rows = one_model(f"gpt2-{args.layers}L", lambda: gpt2(args.layers), args.steps, switch)
    rows += one_model("llama-4L", lambda: llama(4), args.steps, switch)
    rows.append(generate_row(args.steps))
    report("device_mode", rows, {"steps": args.steps, "target": "device-mode step <= 1.3x eager",
                                 "stats": genie.stats()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
