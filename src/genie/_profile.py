"""Spans for ``genie.profile()``: a tiny recorder that costs one global read when nothing listens.

Anyone may record::

    from genie._profile import span, record
    with span("stage 3", "compute"):          # a no-op object unless a profile is active
        ...
    record("recv input 1", "upload", t0_ns, t1_ns, process="server")   # a span timed elsewhere

Categories used by Genie: ``upload``, ``compute``, ``download``, ``wait``, and ``run`` (one whole
staged run, with its peak activation bytes); ``process`` tells client from server spans.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_active: tuple[Profile, ...] = ()  # replaced whole, never mutated: readers need no lock


@dataclass(frozen=True, slots=True)
class Span:
    name: str
    cat: str
    start_ns: int  # time.perf_counter_ns() clock
    end_ns: int
    process: str = "client"
    tid: int = 0
    args: dict | None = None

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


class _NullSpan:
    __slots__ = ()

    def __enter__(self) -> _NullSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_NULL = _NullSpan()


class _LiveSpan:
    __slots__ = ("name", "cat", "args", "t0")

    def __init__(self, name: str, cat: str, args: dict | None) -> None:
        self.name, self.cat, self.args = name, cat, args

    def __enter__(self) -> _LiveSpan:
        self.t0 = time.perf_counter_ns()
        return self

    def __exit__(self, *exc: object) -> None:
        record(self.name, self.cat, self.t0, time.perf_counter_ns(), args=self.args)


def span(name: str, cat: str = "compute", **args: Any) -> _NullSpan | _LiveSpan:
    """A context manager timing ``name``; free (a shared no-op) when no profile is active."""
    if not _active:
        return _NULL
    return _LiveSpan(name, cat, args or None)


def active() -> bool:
    return bool(_active)


def record(name: str, cat: str, start_ns: int, end_ns: int, *, process: str = "client",
           tid: int | None = None, args: dict | None = None) -> None:
    """Add a finished span to every active profile (times from ``time.perf_counter_ns()``)."""
    profiles = _active
    if not profiles:
        return
    s = Span(name, cat, start_ns, end_ns, process, threading.get_ident() if tid is None else tid, args)
    for p in profiles:
        p.add(s)


def record_timeline(timeline: dict, stage_names: Sequence[str], process: str) -> None:
    """Spans of an executor's timeline (``Timeline.to_wire()`` plus optional ``receives``/``sends``
    lists of ``[name, start, end]``), its times already on this process's clock."""
    if not _active:
        return
    for k, (a, b) in enumerate(timeline.get("stages", ())):
        name = stage_names[k] if k < len(stage_names) else str(k)
        record(f"stage {name}", "compute", a, b, process=process)
    for pos, a, b in timeline.get("waits", ()):
        record(f"wait input {pos}", "wait", a, b, process=process)
    for i, a, b in timeline.get("outputs", ()):
        record(f"hand over output {i}", "download", a, b, process=process)
    for cat, key in (("upload", "receives"), ("download", "sends")):
        for name, a, b in timeline.get(key, ()):
            record(name, cat, a, b, process=process)
    if timeline.get("peak_bytes", -1) >= 0 and timeline.get("stages"):
        a, b = timeline["stages"][0][0], timeline["stages"][-1][1]
        record("run", "run", a, b, process=process,
               args={"peak_bytes": timeline["peak_bytes"], "activation_bytes": timeline["activation_bytes"]})


@dataclass(eq=False)
class Profile:
    """Spans recorded while ``with genie.profile() as prof:`` was open, from every thread."""

    spans: list[Span] = field(default_factory=list)
    start_ns: int = 0
    end_ns: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, s: Span) -> None:
        with self._lock:
            self.spans.append(s)

    def __enter__(self) -> Profile:
        global _active
        self.start_ns = time.perf_counter_ns()
        with _lock:
            _active = (*_active, self)
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        self.end_ns = time.perf_counter_ns()
        with _lock:
            _active = tuple(p for p in _active if p is not self)

    # -- reading ------------------------------------------------------------------------------------
    def by_cat(self, cat: str) -> list[Span]:
        return [s for s in self.spans if s.cat == cat]

    def total(self, cat: str) -> float:
        """Seconds spent in spans of ``cat``, added up (overlapping spans count twice)."""
        return sum(s.seconds for s in self.spans if s.cat == cat)

    def chrome_trace(self) -> dict:
        """The Trace Event Format that Perfetto and chrome://tracing open."""
        t0 = min((s.start_ns for s in self.spans), default=self.start_ns)
        pids = {name: i + 1 for i, name in enumerate(dict.fromkeys(s.process for s in self.spans))}
        tids: dict[tuple[str, int], int] = {}
        events: list[dict] = []
        for name, pid in pids.items():
            events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                           "args": {"name": f"genie {name} (pid {os.getpid()})"}})
        for s in sorted(self.spans, key=lambda s: s.start_ns):
            tid = tids.setdefault((s.process, s.tid), len(tids) + 1)
            ev = {"name": s.name, "cat": s.cat, "ph": "X", "pid": pids[s.process], "tid": tid,
                  "ts": (s.start_ns - t0) / 1e3, "dur": max(s.end_ns - s.start_ns, 0) / 1e3}
            if s.args:
                ev["args"] = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                              for k, v in s.args.items()}
            events.append(ev)
        for (process, raw), tid in tids.items():
            events.append({"ph": "M", "name": "thread_name", "pid": pids[process], "tid": tid,
                           "args": {"name": f"thread {raw}"}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def export_chrome_trace(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.chrome_trace()))
        return p

    def rows(self) -> Iterator[tuple[str, str, int, float, float, float]]:
        """(category, name, count, total s, mean s, max s), biggest total first."""
        groups: dict[tuple[str, str], list[float]] = defaultdict(list)
        for s in self.spans:
            groups[(s.cat, s.name)].append(s.seconds)
        for (cat, name), ds in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
            yield cat, name, len(ds), sum(ds), sum(ds) / len(ds), max(ds)

    def summary(self, *, print_: bool = True, limit: int = 40) -> str:
        """A table of spans by category and name; printed, and returned as text."""
        wall = (self.end_ns or time.perf_counter_ns()) - self.start_ns
        lines = [f"genie.profile: {len(self.spans)} spans over {wall / 1e6:.2f} ms",
                 f"{'category':<10} {'name':<40} {'count':>6} {'total ms':>10} {'mean ms':>9} {'max ms':>9}"]
        rows = list(self.rows())
        for cat, name, n, tot, mean, mx in rows[:limit]:
            lines.append(f"{cat:<10} {name[:40]:<40} {n:>6} {tot * 1e3:>10.3f} {mean * 1e3:>9.3f} "
                         f"{mx * 1e3:>9.3f}")
        if len(rows) > limit:
            lines.append(f"... {len(rows) - limit} more")
        cats = defaultdict(float)
        for s in self.spans:
            cats[s.cat] += s.seconds
        lines.append("totals: " + ", ".join(f"{c} {t * 1e3:.3f} ms" for c, t in sorted(cats.items())))
        text = "\n".join(lines)
        if print_:
            print(text)
        return text


def profile() -> Profile:
    """``with genie.profile() as prof:`` records upload, compute, download and wait spans."""
    return Profile()
