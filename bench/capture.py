"""Capture cost per recorded op: cold, warm (shape cache hit), against eager and torch.fx.

Rows are (model, mode): ``capture`` records under ``genie.capture()`` and also times
``genie.get_graph()``; ``device`` records a ``model.to("remote_accelerator:0")`` forward (the path
HF ``generate`` takes). ``warm`` is record only; ``warm+graph`` adds building the graph where one is
asked for. Device rows split the warm time into what ``LazyTensor.__torch_dispatch__`` spends
(Genie's recording) and the rest (the model's Python, torch's dispatcher, entering the subclass):
the rest is a floor no recording speed-up can go below. The last table counts shape-cache hits for
``x + i`` with a new Python int each call.

    python bench/capture.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GENIE_SERVER", "inprocess")  # device-mode flushes between runs, no wire
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import best_of, report  # noqa: E402

import genie  # noqa: E402
from genie.lazy import SHAPES  # noqa: E402
from genie.lazy._lazy import LazyTensor, current_recorder  # noqa: E402

torch.set_num_threads(1)
DEV = "remote_accelerator:0"
TARGET_US = 8.0


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), torch.randint(0, 128, (1, 16)), lambda m, x: m(x).logits


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=128, max_position_embeddings=64)
    # with its cache, as in decode: without one (and no mask) HF checks for packed sequences with
    # an ``.all()`` that syncs, so every forward would pay a flush
    return Qwen2ForCausalLM(cfg).eval(), torch.randint(0, 128, (1, 16)), lambda m, x: m(x).logits


def mlp():
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [torch.nn.Linear(64, 64), torch.nn.GELU()]
    return torch.nn.Sequential(*layers).eval(), torch.randn(4, 64), lambda m, x: m(x)


def fx_per_node(model, x) -> float | str:
    try:
        t0 = time.perf_counter()
        gm = torch.fx.symbolic_trace(model)
        return (time.perf_counter() - t0) / len(gm.graph.nodes) * 1e6
    except Exception:  # HF models are not symbolically traceable with plain fx
        return "n/a"


def measure_capture(name, model, x, call) -> dict:
    def capture_once():
        with genie.capture() as rec:
            out = call(model, x)  # noqa: F841 (kept alive: it is the graph's output)
        return len(rec.history)

    def capture_and_graph():
        with genie.capture():
            out = call(model, x)  # noqa: F841
        return genie.get_graph()

    SHAPES.clear()
    n_ops = capture_once()
    warm = best_of(capture_once, 7)
    warm_graph = best_of(capture_and_graph, 7)
    n_nodes = len(capture_and_graph().nodes)
    SHAPES.clear()  # cold cache in a warmed-up process: every op pays its meta kernel once
    t0 = time.perf_counter()
    capture_once()
    cold = time.perf_counter() - t0
    return {"model": name, "mode": "capture", "ops": n_ops, "cold_us_per_op": cold / n_ops * 1e6,
            "warm_us_per_op": warm / n_ops * 1e6, "warm+graph_us_per_op": warm_graph / n_ops * 1e6,
            "get_graph_us_per_node": (warm_graph - warm) / n_nodes * 1e6}


def measure_device(name, model, x, call) -> dict:
    model = model.to(DEV)
    xd = x.to(DEV)
    rec = current_recorder()
    rec.flush()
    times: list[float] = []

    def record_once():
        t0 = time.perf_counter()
        out = call(model, xd)
        times.append(time.perf_counter() - t0)
        n = len(rec.pending)
        del out
        rec.flush()  # nothing wanted: not timed, keeps each run's pending list the same
        return n

    SHAPES.clear()
    n_ops = record_once()
    cold = times[-1]
    for _ in range(7):
        record_once()
    warm = min(times[1:])
    inside = _time_in_dispatch(record_once)
    return {"model": name, "mode": "device", "ops": n_ops, "cold_us_per_op": cold / n_ops * 1e6,
            "warm_us_per_op": warm / n_ops * 1e6, "warm+graph_us_per_op": "",
            "get_graph_us_per_node": "", "in_dispatch_us_per_op": inside / n_ops * 1e6,
            "outside_us_per_op": (warm - inside) / n_ops * 1e6}


def _time_in_dispatch(run) -> float:
    """Seconds one warm run spends inside ``LazyTensor.__torch_dispatch__`` (best of 5): the rest
    is the model's own Python, torch's dispatcher and entry into the subclass, factory kernels."""
    orig = LazyTensor.__dict__["__torch_dispatch__"].__func__
    spent = [0.0]

    def timed(cls, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        try:
            return orig(cls, func, types, args, kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    LazyTensor.__torch_dispatch__ = classmethod(timed)
    try:
        best = float("inf")
        for _ in range(5):
            spent[0] = 0.0
            run()
            best = min(best, spent[0])
        return best
    finally:
        LazyTensor.__torch_dispatch__ = classmethod(orig)


def measure(name, build) -> list[dict]:
    model, x, call = build()
    with torch.no_grad():
        call(model, x)
        eager = best_of(lambda: call(model, x), 7)
        rows = [measure_capture(name, model, x, call), measure_device(name, model, x, call)]
    for r in rows:
        r.setdefault("in_dispatch_us_per_op", "")
        r.setdefault("outside_us_per_op", "")
        r["eager_us_per_op"] = eager / r["ops"] * 1e6
        r["fx_us_per_node"] = fx_per_node(model, x) if r["mode"] == "capture" else ""
    return rows


def scalar_keys(n: int = 200) -> dict:
    """``x + i`` with a new int each call: the output meta does not depend on ``i``."""
    x = torch.randn(4, 4, device=DEV)
    SHAPES.clear()
    for i in range(n):
        y = x + i  # noqa: F841
    add = {"case": "x + i (new int each call)", "calls": n, "hits": SHAPES.hits, "misses": SHAPES.misses}
    current_recorder().flush()
    return add


def main() -> None:
    rows = [*measure("gpt2-2layer", gpt2), *measure("qwen2-3layer", qwen2), *measure("mlp-8x64", mlp)]
    report("capture", rows, {"targets": {"warm_us_per_op": TARGET_US, "cold_us_per_op": 60}})
    report("capture_scalar_keys", [scalar_keys()])


if __name__ == "__main__":
    main()
