"""Conv + BatchNorm + ReLU microbenchmarks: genie.kernels.conv2d_bn_act against torch, on the conv
shapes of ResNet-50 (224x224 input) at batch 1 and 32.

Baselines, both cuDNN: "unfused" is ``relu(bn(conv(x)))`` as an eval-mode model runs it (three
kernels); "folded" is ``relu(conv(x, w', b'))`` with the BatchNorm folded into the weights ahead of
time (two kernels), the best plain torch can do without a compiler.

Prints a table and writes bench/results/conv.json. Without a GPU it says so, runs a tiny check of
the kernels in Triton's interpreter, writes that to the JSON, and exits 0.

    python bench/conv.py [--quick] [--dtype float16|bfloat16] [--out PATH]
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
from torch import nn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = "cuda"
TARGET = "conv-bn-relu >= 1.2x unfused cuDNN"

# (name, in_channels, out_channels, kernel, stride, input size): every distinct conv of ResNet-50.
RESNET50 = [
    ("stem", 3, 64, 7, 2, 224),
    ("l1.1x1.reduce", 64, 64, 1, 1, 56),
    ("l1.3x3", 64, 64, 3, 1, 56),
    ("l1.1x1.expand", 64, 256, 1, 1, 56),
    ("l1.1x1.in", 256, 64, 1, 1, 56),
    ("l2.1x1.reduce", 256, 128, 1, 1, 56),
    ("l2.3x3.s2", 128, 128, 3, 2, 56),
    ("l2.downsample", 256, 512, 1, 2, 56),
    ("l2.1x1.expand", 128, 512, 1, 1, 28),
    ("l2.1x1.in", 512, 128, 1, 1, 28),
    ("l2.3x3", 128, 128, 3, 1, 28),
    ("l3.1x1.reduce", 512, 256, 1, 1, 28),
    ("l3.3x3.s2", 256, 256, 3, 2, 28),
    ("l3.downsample", 512, 1024, 1, 2, 28),
    ("l3.1x1.expand", 256, 1024, 1, 1, 14),
    ("l3.1x1.in", 1024, 256, 1, 1, 14),
    ("l3.3x3", 256, 256, 3, 1, 14),
    ("l4.1x1.reduce", 1024, 512, 1, 1, 14),
    ("l4.3x3.s2", 512, 512, 3, 2, 14),
    ("l4.downsample", 1024, 2048, 1, 2, 14),
    ("l4.1x1.expand", 512, 2048, 1, 1, 7),
    ("l4.1x1.in", 2048, 512, 1, 1, 7),
    ("l4.3x3", 512, 512, 3, 1, 7),
]
QUICK = {"stem", "l1.3x3", "l2.3x3.s2", "l3.1x1.in", "l4.3x3"}


def _environment() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no GPU)",
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}


def _block(c_in: int, c_out: int, kernel: int, stride: int,
           dtype: torch.dtype) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False)
    bn = nn.BatchNorm2d(c_out)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    # Inference: eval mode, frozen parameters (the fused kernel is forward-only).
    return tuple(m.to(DEVICE, dtype).eval().requires_grad_(False) for m in (conv, bn))


# --- no GPU: interpreter sanity run ----------------------------------------------------------------


def sanity(out: Path) -> int:
    print("No GPU present: skipping the benchmark; a tiny sanity run of the kernels in Triton's "
          "interpreter instead.")
    os.environ["TRITON_INTERPRET"] = "1"  # before genie.kernels builds (and triton imports) anything
    import genie.kernels as K

    global DEVICE
    DEVICE = "cpu"
    torch.manual_seed(0)
    rows = []
    cases = (("3x3", 8, 16, 3, 1, 9, 1), ("1x1.s2", 16, 8, 1, 2, 11, 1), ("depthwise", 8, 8, 3, 2, 10, 8))
    for name, c_in, c_out, kernel, stride, size, groups in cases:
        _, bn = _block(c_in, c_out, kernel, stride, torch.float32)
        weight = torch.randn(c_out, c_in // groups, kernel, kernel) * 0.2
        x = torch.randn(1, c_in, size, size)
        start = time.perf_counter()
        got = K.conv2d_bn_act(x, weight, bn=bn, stride=stride, padding=kernel // 2, groups=groups)
        seconds = time.perf_counter() - start
        want = F.relu(bn(F.conv2d(x, weight, None, stride, kernel // 2, 1, groups)))
        rows.append(dict(conv=name, shape=f"{c_in}->{c_out} k{kernel} s{stride} @{size}", seconds=seconds,
                         max_abs_err=(got - want).abs().max().item()))
    ok = all(r["max_abs_err"] < 1e-3 for r in rows)
    _table("interpreter sanity (not a benchmark)", rows, ["conv", "shape", "max_abs_err", "seconds"])
    _write({"name": "conv", "gpu": False, "note": "no GPU present: interpreter sanity run only",
            "environment": _environment(), "sanity": rows, "sanity_ok": ok, "target": TARGET}, out)
    return 0 if ok else 1


# --- GPU -------------------------------------------------------------------------------------------


def _time_ms(fn) -> float:
    from triton.testing import do_bench

    fn()  # compile / autotune / pick a cuDNN algorithm outside the timed runs
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100)


def _row(name: str, c_in: int, c_out: int, kernel: int, stride: int, size: int, batch: int,
         dtype: torch.dtype) -> dict:
    import genie.kernels as K

    conv, bn = _block(c_in, c_out, kernel, stride, dtype)
    # channels-last on both sides: the layout cuDNN and our kernel are fastest in
    x = torch.randn(batch, c_in, size, size, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last)
    conv = conv.to(memory_format=torch.channels_last)
    pad = kernel // 2
    folded_w, folded_b = K.fold_batchnorm(conv.weight, None, bn)
    with torch.no_grad():
        unfused = _time_ms(lambda: F.relu(bn(conv(x))))
        folded = _time_ms(lambda: F.relu(F.conv2d(x, folded_w, folded_b, stride, pad)))
        ours = _time_ms(lambda: K.conv2d_bn_act(x, conv.weight, bn=bn, stride=stride, padding=pad))
        err = (K.conv2d_bn_act(x, conv.weight, bn=bn, stride=stride, padding=pad) - F.relu(bn(conv(x))))
    out_size = (size + 2 * pad - kernel) // stride + 1
    flops = 2 * batch * c_out * out_size * out_size * c_in * kernel * kernel
    return dict(conv=name, batch=batch, shape=f"{c_in}->{c_out} k{kernel} s{stride} @{size}",
                genie_us=ours * 1e3, unfused_us=unfused * 1e3, folded_us=folded * 1e3,
                genie_tflops=flops / (ours * 1e-3) / 1e12, vs_unfused=unfused / ours, vs_folded=folded / ours,
                max_abs_err=err.abs().max().item())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="five representative layers")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--out", type=Path, default=RESULTS / "conv.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        return sanity(args.out)
    dtype = getattr(torch, args.dtype)
    layers = [layer for layer in RESNET50 if not args.quick or layer[0] in QUICK]
    rows = [_row(*layer, batch=batch, dtype=dtype) for batch in (1, 32) for layer in layers]
    _table(f"conv + bn + relu, ResNet-50 shapes, {args.dtype}", rows,
           ["conv", "batch", "shape", "genie_us", "unfused_us", "folded_us", "genie_tflops", "vs_unfused",
            "vs_folded", "max_abs_err"])
    for batch in (1, 32):
        picked = [r for r in rows if r["batch"] == batch]
        total = {k: sum(r[k] for r in picked) for k in ("genie_us", "unfused_us", "folded_us")}
        print(f"batch {batch}: all layers once: genie {total['genie_us']:.0f} us, unfused "
              f"{total['unfused_us']:.0f} us ({total['unfused_us'] / total['genie_us']:.2f}x), folded "
              f"{total['folded_us']:.0f} us ({total['folded_us'] / total['genie_us']:.2f}x)")
    _write({"name": "conv", "gpu": True, "environment": _environment(), "dtype": args.dtype, "target": TARGET,
            "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
