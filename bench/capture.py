"""Capture cost per recorded op: cold, warm (shape cache hit), against eager and torch.fx.

    python bench/capture.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import best_of, report  # noqa: E402

import genie  # noqa: E402
from genie.lazy import SHAPES  # noqa: E402

torch.set_num_threads(1)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), torch.randint(0, 128, (1, 16)), lambda m, x: m(x).logits


def mlp():
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [torch.nn.Linear(64, 64), torch.nn.GELU()]
    return torch.nn.Sequential(*layers).eval(), torch.randn(4, 64), lambda m, x: m(x)


def fx_per_node(model, x) -> tuple[float, int] | None:
    try:
        t0 = time.perf_counter()
        gm = torch.fx.symbolic_trace(model)
        dt = time.perf_counter() - t0
        return dt, len(gm.graph.nodes)
    except Exception:  # HF models are not symbolically traceable with plain fx
        return None


def measure(name, build) -> dict:
    model, x, call = build()
    SHAPES.clear()

    def capture_once():
        with genie.capture() as rec:
            out = call(model, x)  # noqa: F841 (kept alive: it is the graph's output)
        return len(rec.history)

    t0 = time.perf_counter()
    n_ops = capture_once()
    first = time.perf_counter() - t0
    warm = best_of(capture_once, 5)
    SHAPES.clear()  # cold cache in a warmed-up process: every op pays its meta kernel once
    t0 = time.perf_counter()
    capture_once()
    cold = time.perf_counter() - t0
    with torch.no_grad():
        eager = best_of(lambda: call(model, x), 5)
    capture_once()
    t0 = time.perf_counter()
    graph = genie.get_graph()
    build = time.perf_counter() - t0
    fx = fx_per_node(model, x)
    row = {
        "model": name, "ops": n_ops,
        "first_in_process_us_per_op": first / n_ops * 1e6,
        "cold_us_per_op": cold / n_ops * 1e6,
        "warm_us_per_op": warm / n_ops * 1e6,
        "eager_us_per_op": eager / n_ops * 1e6,
        "get_graph_us_per_node": build / len(graph.nodes) * 1e6,
        "warm_minus_eager_us_per_op": (warm - eager) / n_ops * 1e6,
        "fx_us_per_node": (fx[0] / fx[1] * 1e6) if fx else "n/a",
    }
    return row


def main() -> None:
    rows = [measure("gpt2-2layer", gpt2), measure("mlp-8x64", mlp)]
    report("capture", rows, {"targets": {"warm_us_per_op": 10, "cold_us_per_op": 60}})


if __name__ == "__main__":
    main()
