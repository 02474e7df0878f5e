"""Shared bench helpers: a table on stdout and JSON under bench/results/."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(fn, repeat: int = 5) -> float:
    """Seconds for the fastest of ``repeat`` calls: the least disturbed by a noisy machine."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def report(name: str, rows: list[dict], notes: dict | None = None) -> Path:
    cols = list(rows[0]) if rows else []
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(_fmt(r[c]).ljust(w) for c, w in zip(cols, widths, strict=True)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"bench": name, "machine": platform.node(), "rows": rows,
                                "notes": notes or {}}, indent=2))
    print(f"wrote {path}")
    return path


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)
