"""Every kept config of every kernel, compiled ahead of time for Hopper (sm_90) on any machine: no GPU
needed, only triton's NVIDIA backend and its bundled ptxas. Prints registers, spills, shared memory,
and whether the PTX uses wgmma, TMA, cp.async or mma.sync; writes bench/results/kernels_aot.json.
Exits 1 if any kept config spills.

    python bench/kernels_aot.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from _tables import _table, _write  # noqa: E402 (bench/ is on sys.path)

RESULTS = Path(__file__).resolve().parent / "results"


def _cases(quick: bool):
    from genie.kernels import _aot

    if quick:
        yield from _aot.attention_cases(head_dims=(64,), causal=(True,))
        yield from _aot.conv_cases(ksizes=(3,), layouts=(True,))
        yield from _aot.decode_cases()
        return
    yield from _aot.attention_cases(head_dims=(32, 64, 128, 256), dtypes=("fp16", "bf16"))
    yield from _aot.attention_cases(head_dims=(32, 64, 128), dtypes=("fp32",), causal=(True,))
    yield from _aot.conv_cases(dtypes=("fp16", "bf16"))
    yield from _aot.decode_cases()
    yield _aot.depthwise_case()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one head dim, one conv size, causal only")
    parser.add_argument("--out", type=Path, default=RESULTS / "kernels_aot.json")
    args = parser.parse_args(argv)
    from genie.kernels import _aot

    rows, start = [], time.perf_counter()
    for case in _cases(args.quick):
        r = _aot.report(case.compile())
        rows.append(dict(kernel=case.kernel, config=case.label, regs=r.regs, spills=r.spills,
                         shared_kb=r.shared / 1024,
                         wgmma=r.wgmma, tma=r.tma, cp_async=r.cp_async, mma_sync=r.mma_sync))
    _table("sm_90, every kept config (regs per thread, spill bytes per thread, shared KiB per block)", rows,
           ["kernel", "config", "regs", "spills", "shared_kb", "wgmma", "tma", "cp_async", "mma_sync"])
    spilling = [r["config"] for r in rows if r["spills"]]
    print(f"\n{len(rows)} configs in {time.perf_counter() - start:.0f} s; spilling: {spilling or 'none'}")
    _write({"name": "kernels_aot", "target": "cuda sm_90 (ptxas -v)", "rows": rows, "spilling": spilling},
           args.out)
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
