"""``make demo``: a small GPT-2 (random weights) through Genie, with a report.

Runs on the default backend: the embedded ``genie serve`` on loopback unless GENIE_SERVER says
otherwise. Prints whether it matched eager, capture cost, latency remote/local, bytes per decode
step, cache hits, the workload profile and plan, and the plan run through ``genie.execute`` with
the server's own timeline.
"""

from __future__ import annotations

import copy
import os
import time
import warnings

import torch

DEV = "remote_accelerator:0"


def _model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _greedy(model, ids, steps, on_step=None):
    tokens, past, cur = [], None, ids
    for i in range(steps):
        out = model(cur, past_key_values=past, use_cache=True)
        past = out.past_key_values
        cur = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(cur.item()))
        if on_step is not None:
            on_step(i)
    return tokens


def _row(name: str, value: object) -> None:
    print(f"  {name:<38} {value}")


@torch.no_grad()
def main() -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' past_key_values rename
    import genie

    model = _model()
    ids = torch.randint(0, 512, (1, 24))
    print("genie demo: GPT-2 (4 layers, d=128, random weights), prompt of 24 tokens")

    t0 = time.perf_counter()
    want = model(ids).logits
    local_s = time.perf_counter() - t0

    remote = copy.deepcopy(model).to(DEV)
    got = remote(ids.to(DEV)).logits.cpu()  # first run: uploads weights, warms caches
    t0 = time.perf_counter()
    got = remote(ids.to(DEV)).logits.cpu()
    remote_s = time.perf_counter() - t0
    local_s = min(local_s, _time(lambda: model(ids)))
    err = (got - want).abs().max().item()

    with genie.capture() as rec:
        out = model(ids).logits  # noqa: F841 (the capture's output)
    t0 = time.perf_counter()
    with genie.capture() as rec:
        out = model(ids).logits  # noqa: F841
    capture_us = (time.perf_counter() - t0) / len(rec.history) * 1e6
    graph = genie.get_graph()

    steps = 16
    want_tokens = _greedy(model, ids, steps)
    before = genie.stats()
    marks = [genie.stats()]
    got_tokens = _greedy(remote, ids.to(DEV), steps, on_step=lambda i: marks.append(genie.stats()))
    after = genie.stats()

    print("\nresults")
    _row("forward matches eager (max |err|)", f"{'yes' if err < 1e-4 else 'NO'} ({err:.2e})")
    _row("greedy decode matches eager (16 steps)", "yes" if got_tokens == want_tokens else "NO")
    _row("forward latency remote / local", f"{remote_s * 1e3:.1f} ms / {local_s * 1e3:.1f} ms "
         f"= {remote_s / local_s:.2f}x")
    _row("capture cost (warm)", f"{capture_us:.1f} us/op over {len(rec.history)} ops")
    _row("graph", f"{len(graph.nodes)} nodes, {len(graph.constants)} weights, digest {graph.digest[:12]}")
    sent = [b.get("bytes_sent", 0) - a.get("bytes_sent", 0) for a, b in zip(marks, marks[1:], strict=False)]
    if any(sent):
        _row("bytes sent per decode step (steady)", f"{sorted(sent)[len(sent) // 2]} B (median)")
    for key in ("round_trips", "uploads", "uploads_skipped", "template_hits", "shape_cache_hits"):
        if key in after:
            _row(key.replace("_", " "), after[key] - before.get(key, 0) if key != "shape_cache_hits"
                 else after[key])
    _semantic_report(graph)
    planned_err = _planned_run(graph, ids, want)
    ok = err < 1e-4 and got_tokens == want_tokens and planned_err < 1e-4
    print("\n" + ("demo OK" if ok else "demo FAILED: results differ from eager"))
    return 0 if ok else 1


def _time(fn) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _semantic_report(graph) -> None:
    import genie

    if not hasattr(genie, "analyze"):
        return
    profile = genie.analyze(graph)
    plan = genie.schedule(graph, profile)
    print("\nworkload profile")
    print(profile)
    print("\nexecution plan")
    print(plan)


def _planned_run(graph, ids, want) -> float:
    """``genie.execute`` of the captured forward: the plan's fused stages on the server, with the
    server's own timeline brought back by ``genie.profile()``. Returns the max error against eager."""
    import trio

    import genie

    trio.run(genie.execute, graph, ids)  # warm: plan cached on both sides
    with genie.profile() as prof:
        (logits,) = trio.run(genie.execute, graph, ids)
    err = (logits - want).abs().max().item()
    server = [s for s in prof.spans if s.process == "server"]
    stages = [s for s in server if s.cat == "compute"]
    run = next((s for s in server if s.cat == "run"), None)
    print("\nplanned run (genie.execute) on the server")
    _row("matches eager (max |err|)", f"{'yes' if err < 1e-4 else 'NO'} ({err:.2e})")
    _row("stages run", f"{len(stages)}, {sum(s.seconds for s in stages) * 1e3:.1f} ms of compute")
    if run is not None:
        _row("activations peak / all", f"{run.args['peak_bytes'] / 1e6:.2f} MB / "
             f"{run.args['activation_bytes'] / 1e6:.2f} MB")
    prof.summary(limit=8)
    return err


if __name__ == "__main__":
    raise SystemExit(main())
