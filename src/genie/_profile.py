"""Spans and sync points for ``genie.profile()``: a recorder that costs one global read when nothing listens.

Anyone may record::

    from genie._profile import span, record
    with span("stage 3", "compute"):          # a no-op object unless a profile is active
        ...
    record("recv input 1", "upload", t0_ns, t1_ns, process="server")   # a span timed elsewhere

Categories used by Genie: ``upload``, ``compute``, ``download``, ``wait``, ``run`` (one whole
staged run, with its peak activation bytes), ``sync`` (a flush: one run of what device mode
recorded) and ``capture`` (the time spent recording ops since the previous flush); ``process``
tells client from server spans, ``pid`` says which OS process the server was.

Sync points: ``Recorder.flush`` is wrapped by ``sync_point`` and ``LazyTensor.__torch_dispatch__``
reads a mirrored global (``mirror_watching``). While a profile is open or ``GENIE_SYNC_DEBUG=1``,
each flush is blamed on the first stack frame outside genie and torch (so an HF user sees
transformers' own line), with why it happened, and ops are timed as recording. Otherwise both
cost one global read.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

_lock = threading.Lock()
_active: tuple[Profile, ...] = ()  # replaced whole, never mutated: readers need no lock
_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Span:
    name: str
    cat: str
    start_ns: int  # time.perf_counter_ns() clock
    end_ns: int
    process: str = "client"
    tid: int = 0
    args: dict | None = None
    pid: int | None = None  # the OS process it ran in; None: this one

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


@dataclass(frozen=True, slots=True)
class SyncPoint:
    """One flush: the program recorded so far ran (a round trip when ``wait``), because of ``why``
    at the user's ``file:line``."""

    file: str
    line: int
    function: str
    why: str  # "cpu", "item", "bool", "tolist", "print", "data-dependent shape", "compile", ...
    ops: int  # ops pending when it began
    start_ns: int
    end_ns: int
    wait: bool  # False: submitted without waiting (genie.compile, genie.fetch), unless a shape was needed
    capture_ns: int  # time spent recording ops on this thread since its previous flush
    capture_ops: int  # ops recorded in that time
    thread: int

    @property
    def where(self) -> str:
        """``file:line (function)``, the file relative to the working directory or sys.path."""
        return f"{_short(self.file)}:{self.line} ({self.function})"

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
           tid: int | None = None, args: dict | None = None, pid: int | None = None) -> None:
    """Add a finished span to every active profile (times from ``time.perf_counter_ns()``)."""
    profiles = _active
    if not profiles:
        return
    s = Span(name, cat, start_ns, end_ns, process, threading.get_ident() if tid is None else tid, args, pid)
    for p in profiles:
        p.add(s)


def record_timeline(timeline: dict, stage_names: Sequence[str], process: str) -> None:
    """Spans of an executor's timeline (``Timeline.to_wire()`` plus optional ``receives``/``sends``
    lists of ``[name, start, end]``), its times already on this process's clock. Its ``pid`` (set
    by the remote backend from the server's welcome) names the process it ran in; without one it
    ran in this process."""
    if not _active:
        return
    pid = timeline.get("pid")
    pid = pid if type(pid) is int else None

    def add(name: str, cat: str, a: int, b: int, args: dict | None = None) -> None:
        record(name, cat, a, b, process=process, args=args, pid=pid)

    for k, (a, b) in enumerate(timeline.get("stages", ())):
        add(f"stage {stage_names[k] if k < len(stage_names) else k}", "compute", a, b)
    for pos, a, b in timeline.get("waits", ()):
        add(f"wait input {pos}", "wait", a, b)
    for i, a, b in timeline.get("outputs", ()):
        add(f"hand over output {i}", "download", a, b)
    for cat, key in (("upload", "receives"), ("download", "sends")):
        for name, a, b in timeline.get(key, ()):
            add(name, cat, a, b)
    if timeline.get("peak_bytes", -1) >= 0 and timeline.get("stages"):
        a, b = timeline["stages"][0][0], timeline["stages"][-1][1]
        add("run", "run", a, b, {"peak_bytes": timeline["peak_bytes"],
                                 "activation_bytes": timeline["activation_bytes"]})


# -- sync points ------------------------------------------------------------------------------------
_DEBUG = os.environ.get("GENIE_SYNC_DEBUG", "").strip() not in ("", "0")  # read once, at import
_watching = _DEBUG
_mirrors: list[tuple[dict, str]] = []
_epoch = 0  # bumped when a profile opens: recording counted before it is not its own
_sync_log = logging.getLogger("genie.sync")
if _DEBUG:  # a handler of its own: the line shows without any logging setup, and only once
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    _sync_log.addHandler(_handler)
    _sync_log.setLevel(logging.INFO)
    _sync_log.propagate = False


def mirror_watching(namespace: dict, name: str) -> None:
    """Keep ``namespace[name]`` equal to whether sync points are watched, so that a hot path (one
    op's dispatch) pays a read of its own module's global, not an attribute look-up here."""
    _mirrors.append((namespace, name))
    namespace[name] = _watching


def _set_watching() -> None:  # under _lock
    global _watching
    _watching = _DEBUG or bool(_active)
    for namespace, name in _mirrors:
        namespace[name] = _watching


class _Recording(threading.local):
    """One thread's recording time since its last flush. Every attribute exists from the start (a
    missing one on a thread-local costs a caught AttributeError)."""

    def __init__(self) -> None:
        self.ns = 0
        self.ops = 0
        self.flush_ns = 0  # total time in flushes: subtracted from an op that flushed inside
        self.epoch = _epoch


_rec = _Recording()


def recording(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` (one op's dispatch) timed as recording; a flush inside it is not counted."""
    tl = _rec
    f0 = tl.flush_ns
    t0 = time.perf_counter_ns()
    try:
        return fn(*args)
    finally:
        spent = max(time.perf_counter_ns() - t0 - (tl.flush_ns - f0), 0)  # nested flushes count twice
        if tl.epoch != _epoch:
            tl.epoch, tl.ns, tl.ops = _epoch, 0, 0
        tl.ns += spent
        tl.ops += 1


def sync_point(flush: _F) -> _F:
    """Wraps ``Recorder.flush(wanted, extra, *, wait)``: while watched, each call is a SyncPoint."""

    @functools.wraps(flush)
    def watched(rec: Any, wanted: Any = (), extra: Any = (), **kw: Any) -> Any:
        if not _watching:
            return flush(rec, wanted, extra, **kw)
        return _watch(flush, rec, list(wanted), list(extra), kw)

    return watched  # type: ignore[return-value]


def _watch(flush: Callable[..., Any], rec: Any, wanted: list, extra: list, kw: dict) -> Any:
    ops = len(rec.pending)
    if not (ops or wanted or extra):
        return flush(rec, wanted, extra, **kw)  # nothing to run, nothing to fetch: no sync
    frame, why = _blame(sys._getframe(2))  # 0: here, 1: the wrapper, 2: flush's caller
    tl = _rec
    t0 = time.perf_counter_ns()
    try:
        return flush(rec, wanted, extra, **kw)
    finally:
        t1 = time.perf_counter_ns()
        tl.flush_ns += t1 - t0
        if tl.epoch != _epoch:
            tl.epoch, tl.ns, tl.ops = _epoch, 0, 0
        if frame is None:
            file, line, function = "<genie>", 0, "?"
        else:
            file, line, function = frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name
        sp = SyncPoint(file, line, function, why, ops, t0, t1, kw.get("wait", True), tl.ns, tl.ops,
                       threading.get_ident())
        tl.ns = tl.ops = 0
        _report(sp)


def _report(sp: SyncPoint) -> None:
    profiles = _active
    if profiles:
        if sp.capture_ops:  # the time recording took, drawn as one block just before the flush
            record("record ops", "capture", sp.start_ns - sp.capture_ns, sp.start_ns,
                   args={"ops": sp.capture_ops})
        record(f"sync {sp.why}", "sync", sp.start_ns, sp.end_ns, args={"where": sp.where, "ops": sp.ops})
        for p in profiles:
            p.add_sync(sp)
    if _DEBUG:
        _sync_log.info("%s at %s: %d ops, %.3f ms%s; %.3f ms recording %d ops before it", sp.why, sp.where,
                       sp.ops, sp.seconds * 1e3, "" if sp.wait else " (not waited for)",
                       sp.capture_ns / 1e6, sp.capture_ops)


# Why a flush happened, from the genie frames between it and the user's code. A cause is the
# innermost such frame (``.cpu()`` is a ``_to_copy``); an API frame further out overrides it
# (``tolist`` calls ``.cpu()``, ``bool(t)`` reads ``item``). Keyed by (file name, function).
_CAUSES = {("_lazy.py", "_to_copy"): "cpu", ("_lazy.py", "copy_into"): "copy to host",
           ("_lazy.py", "_record"): "data-dependent shape",
           ("_lazy.py", "import_into"): "read from another thread"}
_API = {("_lazy.py", "tolist"): "tolist", ("_lazy.py", "__bool__"): "bool", ("_lazy.py", "__repr__"): "print"}
_API_FILES = {"_compile.py": "compile", "_async.py": "fetch"}
_OPS = {"_local_scalar_dense": "item"}  # ops returning no tensor (their name otherwise: "equal")
_internal: dict[str, bool] = {}
_prefixes: tuple[str, ...] = ()


def _is_internal(filename: str) -> bool:
    global _prefixes
    hit = _internal.get(filename)
    if hit is None:
        if not _prefixes:
            roots = [os.path.dirname(os.path.abspath(__file__))]
            torch = sys.modules.get("torch")
            if torch is not None and torch.__file__:
                roots.append(os.path.dirname(os.path.abspath(torch.__file__)))
            _prefixes = tuple(r + os.sep for r in roots)
        hit = filename.startswith("<") or os.path.abspath(filename).startswith(_prefixes)
        _internal[filename] = hit
    return hit


def _blame(frame: FrameType | None) -> tuple[FrameType | None, str]:
    """The first frame outside genie and torch, and why the genie frames inside it flushed."""
    cause = api = None
    while frame is not None and _is_internal(frame.f_code.co_filename):
        code = frame.f_code
        key = (os.path.basename(code.co_filename), code.co_name)
        hit = _API.get(key) or _API_FILES.get(key[0])
        if hit is not None:
            api = hit
        elif cause is None:
            cause = _CAUSES.get(key)
            if cause is None and key == ("_lazy.py", "dispatch"):
                func = frame.f_locals.get("func")
                name = getattr(func, "_opname", None) or str(func)
                cause = _OPS.get(name, name)
        frame = frame.f_back
    return frame, api or cause or "flush"


def _short(path: str) -> str:
    """``path`` relative to its site-packages (``transformers/generation/utils.py``), else to the
    working directory, else as it is."""
    full = os.path.abspath(path)
    roots = [r for r in (os.path.abspath(p) + os.sep for p in sys.path if p.endswith("-packages"))
             if full.startswith(r)]
    if roots:
        return full[len(max(roots, key=len)):]
    cwd = os.getcwd() + os.sep
    return full[len(cwd):] if full.startswith(cwd) else path


# -- the profile ------------------------------------------------------------------------------------
@dataclass(eq=False)
class Profile:
    """Spans and sync points recorded while ``with genie.profile() as prof:`` was open, from every
    thread."""

    spans: list[Span] = field(default_factory=list)
    sync_points: list[SyncPoint] = field(default_factory=list)
    start_ns: int = 0
    end_ns: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, s: Span) -> None:
        with self._lock:
            self.spans.append(s)

    def add_sync(self, s: SyncPoint) -> None:
        with self._lock:
            self.sync_points.append(s)

    def __enter__(self) -> Profile:
        global _active, _epoch
        self.start_ns = time.perf_counter_ns()
        with _lock:
            _active = (*_active, self)
            _epoch += 1
            _set_watching()
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        self.end_ns = time.perf_counter_ns()
        with _lock:
            _active = tuple(p for p in _active if p is not self)
            _set_watching()

    # -- reading ------------------------------------------------------------------------------------
    def by_cat(self, cat: str) -> list[Span]:
        return [s for s in self.spans if s.cat == cat]

    def total(self, cat: str) -> float:
        """Seconds spent in spans of ``cat``, added up (overlapping spans count twice)."""
        return sum(s.seconds for s in self.spans if s.cat == cat)

    def chrome_trace(self) -> dict:
        """The Trace Event Format that Perfetto and chrome://tracing open. Events carry the OS pid
        of the process they ran in; a server in this process shares our pid, its threads named
        "server (in process)"."""
        me = os.getpid()
        t0 = min((s.start_ns for s in self.spans), default=self.start_ns)
        groups = dict.fromkeys((s.process, s.pid or me) for s in self.spans)
        names: dict[int, list[str]] = defaultdict(list)
        for process, pid in sorted(groups, key=lambda g: g[0] != "client"):
            names[pid].append(process)
        shared = {pid for pid, ns in names.items() if len(ns) > 1}
        events: list[dict] = [
            {"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
             "args": {"name": f"genie {' + '.join(ns)} "
                              f"({'in process, ' if pid == me and ns != ['client'] else ''}pid {pid})"}}
            for pid, ns in names.items()]
        tids: dict[tuple[str, int, int], int] = {}
        for s in sorted(self.spans, key=lambda s: s.start_ns):
            pid = s.pid or me
            tid = tids.setdefault((s.process, pid, s.tid), len(tids) + 1)
            ev = {"name": s.name, "cat": s.cat, "ph": "X", "pid": pid, "tid": tid,
                  "ts": (s.start_ns - t0) / 1e3, "dur": max(s.end_ns - s.start_ns, 0) / 1e3}
            if s.args:
                ev["args"] = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                              for k, v in s.args.items()}
            events.append(ev)
        for (process, pid, raw), tid in tids.items():
            who = f"{process} " if pid in shared else ""
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                           "args": {"name": f"{who}thread {raw}"}})
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

    def sync_rows(self) -> list[tuple[str, int, float, int, str]]:
        """(where, flushes, total s, ops, why: "item x2, bool") per source line, most flushes first."""
        groups: dict[str, list[SyncPoint]] = defaultdict(list)
        for sp in self.sync_points:
            groups[sp.where].append(sp)
        rows = []
        for where, sps in groups.items():
            why = Counter(sp.why for sp in sps)
            rows.append((where, len(sps), sum(sp.seconds for sp in sps), sum(sp.ops for sp in sps),
                         ", ".join(w if n == 1 else f"{w} x{n}" for w, n in why.most_common())))
        rows.sort(key=lambda r: (-r[1], -r[2]))
        return rows

    def sync_summary(self, *, print_: bool = True, limit: int = 20) -> str:
        """Sync points (flushes) per user source line, most first; printed, and returned as text."""
        sps = self.sync_points
        waited = sum(sp.wait for sp in sps)
        lines = [f"sync points: {len(sps)} flushes ({waited} waited for), "
                 f"{sum(sp.seconds for sp in sps) * 1e3:.3f} ms in flushes, "
                 f"{sum(sp.capture_ns for sp in sps) / 1e6:.3f} ms recording "
                 f"{sum(sp.capture_ops for sp in sps)} ops between them"]
        rows = self.sync_rows()
        if rows:
            lines.append(f"{'count':>6} {'total ms':>10} {'ops':>7}  {'why':<24} where")
        for where, n, tot, ops, why in rows[:limit]:
            lines.append(f"{n:>6} {tot * 1e3:>10.3f} {ops:>7}  {why[:24]:<24} {where}")
        if len(rows) > limit:
            lines.append(f"... {len(rows) - limit} more lines")
        text = "\n".join(lines)
        if print_:
            print(text)
        return text

    def summary(self, *, print_: bool = True, limit: int = 40) -> str:
        """A table of spans by category and name, then the sync points; printed, and returned."""
        wall = (self.end_ns or time.perf_counter_ns()) - self.start_ns
        lines = [f"genie.profile: {len(self.spans)} spans over {wall / 1e6:.2f} ms",
                 f"{'category':<10} {'name':<40} {'count':>6} {'total ms':>10} {'mean ms':>9} {'max ms':>9}"]
        rows = list(self.rows())
        for cat, name, n, tot, mean, mx in rows[:limit]:
            lines.append(f"{cat:<10} {name[:40]:<40} {n:>6} {tot * 1e3:>10.3f} {mean * 1e3:>9.3f} "
                         f"{mx * 1e3:>9.3f}")
        if len(rows) > limit:
            lines.append(f"... {len(rows) - limit} more")
        cats: dict[str, float] = defaultdict(float)
        for s in self.spans:
            cats[s.cat] += s.seconds
        lines.append("totals: " + ", ".join(f"{c} {t * 1e3:.3f} ms" for c, t in sorted(cats.items())))
        if self.sync_points:
            lines.append(self.sync_summary(print_=False, limit=10))
        text = "\n".join(lines)
        if print_:
            print(text)
        return text


def profile() -> Profile:
    """``with genie.profile() as prof:`` records upload, compute, download and wait spans, and each
    sync point (``prof.sync_points``, ``prof.sync_summary()``)."""
    return Profile()
