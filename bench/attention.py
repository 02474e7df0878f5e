"""Attention microbenchmarks: genie.kernels against torch SDPA, one row per shape.

- Prefill: TFLOP/s for seq 512..16k, head_dim 64 and 128, causal and not, fp16 and bf16, against SDPA
  pinned to each backend (flash, efficient, cuDNN) through torch.nn.attention.sdpa_kernel. The batch
  shrinks as the sequence grows so every row does 16k tokens' worth of queries.
- Decode: microseconds per step for one new token against a KV cache of 1k..32k (GQA 32/8 heads),
  against SDPA on the same valid prefix.

Prints a table and writes bench/results/attention.json. Without a GPU it says so, runs a tiny check
of the kernels in Triton's interpreter, writes that to the JSON, and exits 0.

    python bench/attention.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: small ops crawl with 2 threads under load

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _tables import _table, _write  # noqa: E402 (bench/ is on sys.path)

RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = "cuda"
TARGETS = {"prefill": "attention >= 1.0x SDPA's best backend", "decode": "decode >= 1.0x SDPA"}


def _environment() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no GPU)"}


# --- no GPU: interpreter sanity run ----------------------------------------------------------------


def sanity(out: Path) -> int:
    print("No GPU present: skipping the benchmark; a tiny sanity run of the kernels in Triton's "
          "interpreter instead.")
    os.environ["TRITON_INTERPRET"] = "1"  # before genie.kernels builds (and triton imports) anything
    import genie.kernels as K

    torch.manual_seed(0)
    rows = []
    for name, dtype, causal in (("attention", torch.float32, True), ("attention", torch.float16, False)):
        q = torch.randn(1, 4, 48, 32, dtype=dtype)  # 4 q heads over 2 kv heads
        k, v = torch.randn(1, 2, 48, 32, dtype=dtype), torch.randn(1, 2, 48, 32, dtype=dtype)
        start = time.perf_counter()
        got = K.attention(q, k, v, causal=causal)
        seconds = time.perf_counter() - start
        want = K.attention_reference(q.float(), k.float(), v.float(), causal=causal)
        rows.append(dict(kernel=name, dtype=str(dtype).removeprefix("torch."), causal=causal,
                         max_abs_err=(got.float() - want).abs().max().item(), seconds=seconds))
    q, k, v = torch.randn(1, 4, 2, 32), torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)
    start = time.perf_counter()
    got = K.decode_attention(q, k, v, 290)
    seconds = time.perf_counter() - start
    rows.append(dict(kernel="decode_attention", dtype="float32", causal=True, seconds=seconds,
                     max_abs_err=(got - K.decode_attention_reference(q, k, v, 290)).abs().max().item()))
    ok = all(r["max_abs_err"] < 1e-2 for r in rows)
    columns = ["kernel", "dtype", "causal", "max_abs_err", "seconds"]
    _table("interpreter sanity (not a benchmark)", rows, columns)
    _write({"name": "attention", "gpu": False, "note": "no GPU present: interpreter sanity run only",
            "environment": _environment(), "sanity": rows, "sanity_ok": ok, "targets": TARGETS}, out)
    return 0 if ok else 1


# --- GPU -------------------------------------------------------------------------------------------


def _sdpa_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
    return {short: getattr(SDPBackend, attr) for short, attr in names.items() if hasattr(SDPBackend, attr)}


def _time_ms(fn, baseline: bool = False) -> float | None:
    """Median milliseconds per call. A baseline (an SDPA backend) that cannot run this shape, dtype or
    GPU gives None; our own kernels' errors propagate."""
    from triton.testing import do_bench

    try:
        fn()  # compile / autotune / pick an algorithm outside the timed runs
        torch.cuda.synchronize()
    except RuntimeError:
        if baseline:
            return None
        raise
    return do_bench(fn, warmup=25, rep=100)


def _prefill_row(dtype: torch.dtype, head_dim: int, causal: bool, seq: int) -> dict:
    import genie.kernels as K
    from torch.nn.attention import sdpa_kernel

    batch, heads = max(1, 16384 // seq), 2048 // head_dim
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=DEVICE, dtype=dtype) for _ in range(3))
    flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)

    def tflops(ms: float | None) -> float | None:
        return None if ms is None else flops / (ms * 1e-3) / 1e12

    row = dict(dtype=str(dtype).removeprefix("torch."), head_dim=head_dim, causal=causal, seq=seq,
               batch=batch, heads=heads, genie=tflops(_time_ms(lambda: K.attention(q, k, v, causal=causal))))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    row["max_abs_err"] = (K.attention(q, k, v, causal=causal) - want).abs().max().item()
    for name, backend in _sdpa_backends().items():
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        row[f"sdpa_{name}"] = tflops(_time_ms(run, baseline=True))
    best = max((row[f"sdpa_{n}"] for n in _sdpa_backends() if row[f"sdpa_{n}"]), default=None)
    row["vs_best_sdpa"] = None if not (best and row["genie"]) else row["genie"] / best
    return row


def prefill(quick: bool) -> list[dict]:
    seqs = (512, 1024, 2048) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    return [_prefill_row(dtype, head_dim, causal, seq)
            for dtype in (torch.float16, torch.bfloat16) for head_dim in (64, 128)
            for causal in (False, True) for seq in seqs]


def _sdpa_gqa(q, k, v):
    """SDPA on grouped k/v: natively (enable_gqa, torch >= 2.5) when it runs, else on expanded heads."""
    try:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)), "native"
    except (TypeError, RuntimeError):
        group = q.shape[1] // k.shape[1]
        ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return (lambda: F.scaled_dot_product_attention(q, ke, ve)), "expanded"


DECODE_HEADS = (32, 8, 128)  # q heads, kv heads, head_dim


def _decode_row(dtype: torch.dtype, batch: int, cache: int) -> dict:
    import genie.kernels as K

    heads, kv_heads, head_dim = DECODE_HEADS
    q = torch.randn(batch, heads, 1, head_dim, device=DEVICE, dtype=dtype)
    # Capacity beyond the valid prefix, as in a real preallocated cache.
    k_cache, v_cache = (torch.randn(batch, kv_heads, cache + 256, head_dim, device=DEVICE, dtype=dtype)
                        for _ in range(2))
    ours = _time_ms(lambda: K.decode_attention(q, k_cache, v_cache, cache))
    sdpa_fn, mode = _sdpa_gqa(q, k_cache[:, :, :cache], v_cache[:, :, :cache])
    sdpa = _time_ms(sdpa_fn, baseline=True)
    err = (K.decode_attention(q, k_cache, v_cache, cache) - sdpa_fn()).abs().max().item()
    return dict(dtype=str(dtype).removeprefix("torch."), batch=batch, cache=cache,
                genie_us=None if ours is None else ours * 1e3, sdpa_us=None if sdpa is None else sdpa * 1e3,
                sdpa_gqa=mode, speedup=None if not (ours and sdpa) else sdpa / ours, max_abs_err=err)


def decode(quick: bool) -> list[dict]:
    caches = (1024, 4096) if quick else (1024, 2048, 4096, 8192, 16384, 32768)
    return [_decode_row(dtype, batch, cache)
            for dtype in (torch.float16, torch.bfloat16) for batch in (1, 8) for cache in caches]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--out", type=Path, default=RESULTS / "attention.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        return sanity(args.out)
    pre, dec = prefill(args.quick), decode(args.quick)
    _table("prefill, TFLOP/s", pre, ["dtype", "head_dim", "causal", "seq", "batch", "heads", "genie",
                                     *(f"sdpa_{n}" for n in _sdpa_backends()), "vs_best_sdpa", "max_abs_err"])
    _table(f"decode: 1 new token, (q heads, kv heads, head_dim) = {DECODE_HEADS}, us per step", dec,
           ["dtype", "batch", "cache", "genie_us", "sdpa_us", "sdpa_gqa", "speedup", "max_abs_err"])
    _write({"name": "attention", "gpu": True, "environment": _environment(), "targets": TARGETS,
            "prefill": pre, "decode": dec}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
