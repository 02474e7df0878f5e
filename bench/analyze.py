"""Analysis + scheduling cost per node on a GPT-2 graph: cold, and warm from the plan cache.

    python bench/analyze.py

Cold: a fresh SemanticAnalyzer and Scheduler (empty caches). Warm: a new Graph object with the same
digest (what the next identical step produces); the cost is then the digest plus two look-ups.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import report  # noqa: E402

import genie  # noqa: E402
from genie.semantic import Scheduler, SemanticAnalyzer  # noqa: E402

torch.set_num_threads(1)


def gpt2_graph(n_layer: int, seq: int) -> genie.Graph:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_embd=64, n_head=4, vocab_size=128, n_positions=256,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 128, (1, seq))
    with genie.capture():
        out = model(ids).logits  # noqa: F841 (the capture's output)
    return genie.get_graph()


def fresh(g: genie.Graph) -> genie.Graph:
    """The same program as a new Graph object: its digest is computed again, as for a new step."""
    return genie.Graph(list(g.nodes), list(g.outputs), g.constants)


def main() -> None:
    rows = []
    for n_layer in (2, 12):
        g = gpt2_graph(n_layer, 64)
        n = len(g.nodes)
        cold_a, cold_s, digest, warm = [], [], [], []
        for _ in range(5):
            analyzer, scheduler = SemanticAnalyzer(), Scheduler()
            h = fresh(g)
            t0 = time.perf_counter()
            _ = h.digest
            t1 = time.perf_counter()
            profile = analyzer.analyze(h)
            t2 = time.perf_counter()
            plan = scheduler.schedule(h, profile)
            t3 = time.perf_counter()
            digest.append(t1 - t0)
            cold_a.append(t2 - t1)
            cold_s.append(t3 - t2)
            w = fresh(g)
            t4 = time.perf_counter()
            again = scheduler.schedule(w, analyzer.analyze(w))
            warm.append(time.perf_counter() - t4)
            assert again is plan and analyzer.hits == 1 and scheduler.hits == 1
        def us(xs: list[float], n: int = n) -> float:
            return min(xs) / n * 1e6

        rows.append({"graph": f"gpt2 {n_layer}L seq64", "nodes": n, "matches": len(profile.matches),
                     "fused": len(plan.fusion_groups), "stages": len(plan.stages),
                     "digest us/node": us(digest), "analyze us/node": us(cold_a),
                     "schedule us/node": us(cold_s), "cold total ms": (min(digest) + min(cold_a) +
                                                                      min(cold_s)) * 1e3,
                     "warm us/node": us(warm), "warm total ms": min(warm) * 1e3})
    report("analyze", rows, {"warm": "new Graph object, same digest: digest + analyzer and plan cache hits",
                             "cold": "empty caches; digest reported separately"})


if __name__ == "__main__":
    main()
