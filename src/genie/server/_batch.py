"""Continuous batching: the ready runs of one program, from any of a tenant's connections, as one run.

Iteration-level, as Orca schedules: a run that arrives joins the queue of its *batch key*; the first
run of a queue with no batch in flight leads: it waits ``--batch-wait`` for more (0: none), takes a
compute slot, then takes up to ``--max-batch`` runs from the front of the queue and runs them as
one. Runs that arrive meanwhile form the next batch, so sessions join whenever their next step
arrives and leave when they stop sending; the queue is first in, first out, so none starves.

Runs batch together only when they share a batch key (``key_of``):

- one program: the same template filled with the same ints (``_tiers.program_key``);
- the same constants (the weights, by digest) and the same dtypes, shapes and strides of their
  inputs and residents (each session's own KV cache, position, last token);
- one tenant: a ``Batcher`` belongs to one tenant's worker process;
- a batch-safe program (``_batched.unbatchable``, from its ops' schemas and guard tables): nothing
  random, no write to a shared constant, and a batched trace (vmap) of only vetted ops.

A batch runs ``_batched``'s traced program on copies of its sessions' sources stacked along a new
dimension (the KV caches' rows included), through the tiers like any replayed program, then copies
each session's written rows back and lays each output out as the session's own run would have.
Each batch size is trusted only after a check: its first batch also runs every session alone, on
the real values, and the rows must equal those runs within the tiers' tolerance (``_tiers.close``),
or the program never batches again. One batch in ``SPOT_EVERY`` is checked again. A batch that
fails (an index out of range in one session) leaves every session's values as they were, and its
runs run alone, each with its own result or error; a cancelled run leaves before its batch starts.

Call tree::

    Batcher.run(conn, job, peak)           in the run's task, on the event loop (None: run it alone)
      key_of(conn, job)
      queue; lead or wait:  _lead(group)    the slot, then up to max_batch runs; one alone goes back
        _run_batch(plan, entries)           in a worker thread: cancelled and bad inputs leave first
          _in_batches(plan, entries)        chunks of the traced sizes (_program: traces in a thread)
            _batched(plan, program, chunk)  stack, run at the tier, check or copy back, lay out
              _check(...)                   a size's first batch, and one in SPOT_EVERY
            else each alone: job_values + job_result
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import outcome
import torch
import trio

from genie._errors import GenieError, RemoteExecutionError
from genie.graph import RESIDENT, Node, TensorMeta
from genie.server._batched import (
    Batched,
    batched_program,
    bucket,
    constants_for,
    sources,
    stack_rows,
    unbatchable,
)
from genie.server._job import Job, JobResult, Lender, check_job, early_fetches, job_result, job_values
from genie.server._tiers import RunValues, close, program_key

if TYPE_CHECKING:
    from genie.server._handler import ConnectionHandler
    from genie.server._serve import Server

MAX_BATCH = 32  # --max-batch's default
MAX_PLANS = 32  # batch keys whose traced sizes a worker keeps (least recently run go first): each
# size is a graph of about the program's nodes times the size, so a tenant cannot pile them up
SPOT_EVERY = 64  # one trusted batch in this many is checked against its runs alone again
BatchKey = tuple
BATCH_COUNTERS = ("batches", "batched_runs", "batch_size_max", "batch_padded_rows", "batch_checks",
                  "batch_rejected", "batch_fallbacks", "batch_traces", "batch_trace_failures",
                  "batch_trace_seconds", "batch_seconds", "batch_copy_seconds", "batch_ready_max")


@dataclass(eq=False)  # found in its queue by identity (its job holds tensors)
class Entry:
    conn: ConnectionHandler
    job: Job
    result: outcome.Outcome | None = None
    alone: bool = False  # the only run ready: it runs as any run does (inline, when it is tiny)


@dataclass
class Group:
    """One batch key's queue, on the event loop."""

    queue: deque[Entry] = field(default_factory=deque)
    leading: bool = False
    wake: trio.Event = field(default_factory=trio.Event)


@dataclass
class Layout:
    """How the session's own run lays out one output: its meta, and its storage's size, or what
    it views: one of the session's sources (input, then resident, by position: a written KV cache),
    or an earlier output (the same value returned twice)."""

    meta: TensorMeta
    nbytes: int
    source: int | None = None
    output: int | None = None


@dataclass
class Plan:
    """One batch key's state across batches (worker threads; under ``lock``)."""

    never: str = ""  # why this key does not batch (for good)
    sizes: dict[int, Batched] = field(default_factory=dict)
    wanted: set[int] = field(default_factory=set)  # sizes to trace
    trusted: set[int] = field(default_factory=set)
    layouts: list[Layout] | None = None
    batches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Batcher:
    """One tenant's batching (in its worker): ``max_batch`` runs at most per batch, ``wait`` seconds
    a leading run waits for more."""

    def __init__(self, server: Server, max_batch: int = MAX_BATCH, wait: float = 0.0) -> None:
        self.server = server
        self.max_batch = max_batch
        self.wait = wait
        self.stats: Counter = server.stats
        self.groups: dict[BatchKey, Group] = {}
        self.plans: OrderedDict[BatchKey, Plan] = OrderedDict()
        self._lock = threading.Lock()
        self._tracing = False

    def report(self) -> dict:
        s = self.stats
        with self._lock:
            plans = [{"program": k[0][0][:16], "never": p.never, "sizes": sorted(p.sizes),
                      "trusted": sorted(p.trusted), "batches": p.batches} for k, p in self.plans.items()]
        return {"max_batch": self.max_batch, "batch_wait": self.wait,
                "batch_size_mean": round(s["batched_runs"] / s["batches"], 2) if s["batches"] else 0.0,
                "batch_programs": plans}

    # -- on the event loop ----------------------------------------------------------------------------
    def key_of(self, conn: ConnectionHandler, job: Job) -> BatchKey | None:
        """The run's batch key, or None when it cannot batch (see the module's docstring)."""
        program = program_key(job.graph)
        if program is None or job.inbound is not None or job.trace or job.written:
            return None
        if early_fetches(job):  # a staged run is its program unless it sends outputs early
            return None
        if unbatchable(job.graph) is not None:
            return None
        own, shared = sources(job.graph)
        shapes = []
        for t in (*job.inputs, *(_own_value(conn, n) for n in own)):
            if t is None:
                return None  # a handle not resident, a constant not held: the run alone says so
            shapes.append((t.dtype, tuple(t.shape), t.stride(), t.device))
        return program, tuple(n.args[0] for n in shared), tuple(shapes)

    def _plan(self, key: BatchKey) -> Plan:
        with self._lock:
            plan = self.plans.get(key)
            if plan is None:
                plan = self.plans[key] = Plan()
                while len(self.plans) > MAX_PLANS:
                    self.plans.popitem(last=False)
            else:
                self.plans.move_to_end(key)
            return plan

    async def run(self, conn: ConnectionHandler, job: Job, peak: int) -> JobResult | None:
        """The run's result, computed in a batch (or alone, when it is the only one ready); None when
        its program does not batch (the caller runs it alone)."""
        key = self.key_of(conn, job)
        if key is None:
            return None
        plan = self._plan(key)
        if plan.never:
            return None
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group()
        entry = Entry(conn, job)
        group.queue.append(entry)
        server = self.server
        try:
            # its predicted peak is held while it waits: a batch's peak is its runs' peaks together
            with server.pool.pinned(job.consts), server.pool.run_reservation(peak):
                while entry.result is None and not entry.alone:
                    if not group.leading:
                        group.leading = True
                        try:
                            await self._lead(plan, group)
                        finally:
                            group.leading = False
                            group.wake.set()
                            group.wake = trio.Event()
                    else:
                        await group.wake.wait()
        finally:
            if entry.result is None and entry in group.queue:  # cancelled while it waited
                group.queue.remove(entry)
            if not group.queue and not group.leading and self.groups.get(key) is group:
                del self.groups[key]
        return None if entry.result is None else entry.result.unwrap()

    async def _lead(self, plan: Plan, group: Group) -> None:
        if self.wait > 0 and len(group.queue) < self.max_batch:
            await trio.sleep(self.wait)
        server = self.server
        lender = Lender(server.compute_limiter)
        await lender.acquire()
        try:
            n = min(len(group.queue), self.max_batch)
            batch = [group.queue.popleft() for _ in range(n)]  # no checkpoint from here: none is lost
            if len(batch) < 2:
                for e in batch:
                    e.alone = True
                return
            self.stats["batch_ready_max"] = max(self.stats["batch_ready_max"], len(batch))  # taken together
            work = functools.partial(self._run_batch, plan, batch)
            try:
                results = await trio.to_thread.run_sync(work, limiter=server.run_threads)
            except trio.Cancelled:  # the leader, before its thread started: the batch has not run
                group.queue.extendleft(reversed(batch))
                raise
            except BaseException as err:  # a genie bug: every run taken fails, named; none waits on
                for e in batch:
                    e.result = outcome.Error(RemoteExecutionError(f"the batch failed: {type(err).__name__}: "
                                                                  f"{err}", op="genie.batch"))
                raise
            for e, r in zip(batch, results, strict=True):
                e.result = r
        finally:
            lender.release()

    # -- in a worker thread ---------------------------------------------------------------------------
    def _run_batch(self, plan: Plan, entries: list[Entry]) -> list[outcome.Outcome]:
        """Each entry's outcome: from one batched run, or (one entry, a batch that failed or cannot
        run yet) from its run alone."""
        results: list[outcome.Outcome | None] = [None] * len(entries)
        live = []
        for i, e in enumerate(entries):  # a cancelled run or a bad input leaves before the batch
            try:
                check_job(e.job)
            except GenieError as err:
                results[i] = outcome.Error(err)
            else:
                live.append(i)
        for i, r in zip(live, self._in_batches(plan, [entries[i] for i in live]), strict=True):
            results[i] = r
        return results  # type: ignore[return-value]

    def _in_batches(self, plan: Plan, entries: list[Entry]) -> list[outcome.Outcome]:
        """Outcomes of ``entries``: in batches of the sizes traced so far (the rest alone)."""
        results: list[outcome.Outcome] = []
        rest = entries
        while len(rest) > 1:
            program = self._program(plan, rest[0], len(rest))
            if program is None:
                break
            chunk, after = rest[:program.size], rest[program.size:]
            done = self._batched(plan, program, chunk)
            if done is None:
                break
            results += done
            rest = after
        return results + [outcome.capture(self._alone, e) for e in rest]

    def _alone(self, e: Entry) -> JobResult:
        values, _, _ = self._values(e)
        return self._result(e, values)

    def _values(self, e: Entry) -> tuple[list, list[int], Any]:
        return job_values(e.job, server=self.server, residents=e.conn.residents, lender=None,
                          send_part=_no_parts)

    def _result(self, e: Entry, values: Sequence[torch.Tensor]) -> JobResult:
        return job_result(e.job, values, server=self.server, residents=e.conn.residents)

    def _batched(self, plan: Plan, program: Batched, entries: list[Entry]) -> list[outcome.Outcome] | None:
        """The entries' outcomes from one batched run of ``program`` (at most its size of them);
        None where they must run alone (the batch failed: their values are as they were)."""
        server = self.server
        size = program.size
        own_nodes, shared_nodes = sources(entries[0].job.graph)
        rows = [[_own_value(e.conn, n) for n in sources(e.job.graph)[0]] for e in entries]
        n_in = len(entries[0].job.inputs)
        pool = server.pool
        stacked_bytes = sum(t.nbytes for t in (*entries[0].job.inputs, *rows[0])) * size
        t0 = time.perf_counter()
        try:
            with pool.pinned([n.args[0] for n in shared_nodes]), pool.run_reservation(2 * stacked_bytes):
                stacked = [stack_rows([e.job.inputs[p] for e in entries], size) for p in range(n_in)]
                stacked += [stack_rows([r[j] for r in rows], size) for j in range(len(own_nodes))]
                copying = time.perf_counter() - t0
                run = RunValues(program.graph, stacked, constants_for(program, pool), {}, (), None)
                outs = server.device.compute(lambda: server.tiers.run(program.key, run))
        except GenieError as err:  # no room for the copies, a guard refused a row: alone, each
            self.stats["batch_fallbacks"] += 1
            self._log(f"batch of {len(entries)} runs alone instead: {err}")
            return None
        except Exception as err:  # noqa: BLE001 (a batched op failed: the rows are copies)
            self.stats["batch_fallbacks"] += 1
            self._log(f"batch of {len(entries)} runs alone instead: {type(err).__name__}: {err}")
            return None
        n_out = len(outs) - len(program.written)
        written_at = [[n.id for n in own_nodes].index(w) for w in program.written]
        with plan.lock:
            plan.batches += 1
            check = size not in plan.trusted or plan.batches % SPOT_EVERY == 0
        if check:
            return self._check(plan, entries, rows, outs, written_at, size)
        assert plan.layouts is not None
        t1 = time.perf_counter()
        laid = []
        for b, e in enumerate(entries):
            for j, at in enumerate(written_at):
                rows[b][at].copy_(outs[n_out + j][b])
            own = [*e.job.inputs, *rows[b]]
            laid.append(_laid_out([outs[k][b] for k in range(n_out)], plan.layouts, own))
        copying += time.perf_counter() - t1
        results = [outcome.capture(self._result, e, values) for e, values in zip(entries, laid, strict=True)]
        self._count(entries, size, program, time.perf_counter() - t0, copying)
        return results

    def _check(self, plan: Plan, entries: list[Entry], rows: list[list[torch.Tensor]],
               outs: list[torch.Tensor], written_at: list[int], size: int) -> list[outcome.Outcome]:
        """The batch's first run (or a spot check): every session runs alone on its real values, and
        its results stand; the batch's rows must equal them, or the program never batches again."""
        alone = [outcome.capture(self._values, e) for e in entries]
        results = [outcome.capture(self._result, e, a.value[0]) if isinstance(a, outcome.Value) else a
                   for e, a in zip(entries, alone, strict=True)]
        if any(isinstance(a, outcome.Error) for a in alone):
            return results  # a session failed alone: nothing to compare it with
        why = ""
        layouts = None
        for b, a in enumerate(alone):
            values = a.value[0]
            mine = [*values, *(rows[b][at] for at in written_at)]
            theirs = [out[b] for out in outs]  # its outputs, then its written residents
            bad = next((i for i, (g, w) in enumerate(zip(theirs, mine, strict=True)) if not close(g, w)),
                       None)
            if bad is not None:
                why = f"a batched run disagreed with its runs alone (value {bad}, row {b})"
                break
            here = _layouts(values, [*entries[b].job.inputs, *rows[b]])
            if layouts is not None and here != layouts:
                why = "its sessions' outputs are laid out differently"
                break
            layouts = here
        with plan.lock:
            if why:
                plan.never = why
                self.stats["batch_rejected"] += 1
                program = program_key(entries[0].job.graph)
                self._log(f"program {program[0][:16] if program else '?'} does not batch: {why}")
            else:
                plan.trusted.add(size)
                plan.layouts = layouts
                self.stats["batch_checks"] += 1
        return results

    def _program(self, plan: Plan, e: Entry, n: int) -> Batched | None:
        """A batched program for up to ``n`` sessions: the size ``n`` pads to once it is traced;
        until then a traced size that pads ``n`` at most twofold, else the largest below ``n`` (the
        caller batches that many); None when none is traced yet. A missing size is traced in a
        thread of its own, one trace at a time per worker, from ``e``'s metadata."""
        want = bucket(n, self.max_batch)
        with plan.lock:
            if plan.never:
                return None
            program = plan.sizes.get(want)
            if program is not None:
                return program
            plan.wanted.add(want)
            above = [k for k in plan.sizes if n <= k <= 2 * n]
            below = [k for k in plan.sizes if k < n]
            pick = min(above) if above else max(below) if below else None
            with self._lock:
                start = not self._tracing
                self._tracing = True
        if start:
            own, shared = sources(e.job.graph)
            args = (e.job.graph, list(e.job.inputs), [_own_value(e.conn, n) for n in own],
                    [self.server.pool[c.args[0]] for c in shared], self.server.device.device,
                    self.server.config.ops != "all")
            threading.Thread(target=self._trace, args=(plan, args), daemon=True,
                             name="genie-batch-trace").start()
        return plan.sizes[pick] if pick is not None else None

    def _trace(self, plan: Plan, args: tuple) -> None:
        """Trace the sizes ``plan`` wants, one after another (only metadata of ``args`` is read)."""
        graph, inputs, residents, constants, device, vetted = args
        try:
            while True:
                with plan.lock:
                    if plan.never or not plan.wanted:
                        return
                    size = min(plan.wanted)
                t0 = time.perf_counter()
                try:
                    program = batched_program(graph, inputs, residents, constants, size, device, vetted)
                except Exception as err:  # noqa: BLE001 (a trace that fails never fails a run)
                    program = f"its batched trace failed ({type(err).__name__}: {err})"
                with plan.lock:
                    plan.wanted.discard(size)
                    if isinstance(program, str):
                        plan.never = program
                        self.stats["batch_trace_failures"] += 1
                        self._log(f"a program does not batch: {program}")
                    else:
                        plan.sizes[size] = program
                        self.stats["batch_traces"] += 1
                        self.stats["batch_trace_seconds"] += time.perf_counter() - t0
        finally:
            with self._lock:
                self._tracing = False

    def _count(self, entries: list[Entry], size: int, program: Batched, seconds: float,
               copying: float) -> None:
        n = len(entries)
        self.stats["batches"] += 1
        self.stats["batched_runs"] += n
        self.stats["batch_size_max"] = max(self.stats["batch_size_max"], n)
        self.stats["batch_padded_rows"] += size - n
        self.stats["batch_seconds"] += seconds
        self.stats["batch_copy_seconds"] += copying  # sessions' values stacked in, written rows out
        self.stats["compute_seconds"] += seconds
        self._log(f"batch of {n} runs (size {size}, program {program.key[0][:16]}, {seconds * 1e3:.1f} ms)")

    def _log(self, line: str) -> None:
        if self.server.verbose:
            print(f"genie serve: {line}", file=sys.stderr, flush=True)


def _own_value(conn: ConnectionHandler, node: Node) -> torch.Tensor | None:
    """A session's own source: its resident value, or its small constant (held by the pool)."""
    if node.op == RESIDENT:
        return conn.residents.get(node.args[0])
    return conn.server.pool.get(node.args[0])


def _layouts(values: Sequence[torch.Tensor], own: Sequence[torch.Tensor]) -> list[Layout]:
    """How a session's own run laid out its outputs: each in memory of its own, or a view of one of
    its sources ``own`` or of an earlier output."""
    at = {s.untyped_storage().data_ptr(): j for j, s in enumerate(own)}
    first: dict[int, int] = {}
    out = []
    for k, v in enumerate(values):
        ptr = v.untyped_storage().data_ptr()
        out.append(Layout(TensorMeta.of(v), v.untyped_storage().nbytes(), at.get(ptr),
                          first.get(ptr) if ptr not in at else None))
        first.setdefault(ptr, k)
    return out


def _laid_out(rows: Sequence[torch.Tensor], layouts: Sequence[Layout],
              own: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A session's outputs (its ``rows`` of the batch's) as its own run lays them out: in memory of
    their own, or views of its own sources (whose rows were copied back already, so they hold the
    rows' values) or of an earlier output."""
    out: list[torch.Tensor] = []
    for row, layout in zip(rows, layouts, strict=True):
        m = layout.meta
        if layout.source is not None or layout.output is not None:
            base = own[layout.source] if layout.source is not None else out[layout.output]  # type: ignore[index]
            view = torch.empty(0, dtype=m.dtype, device=row.device)
            out.append(view.set_(base.untyped_storage(), m.offset, m.shape, m.stride))
            continue
        store = torch.empty(layout.nbytes // m.dtype.itemsize, dtype=m.dtype, device=row.device)
        view = store.as_strided(m.shape, m.stride, m.offset)
        view.copy_(row)
        out.append(view)
    return out


def _no_parts(req_id: int, pos: int, host: torch.Tensor) -> None:  # a batched run has no stages
    raise AssertionError("a batched run sends no parts")


__all__ = ["BATCH_COUNTERS", "MAX_BATCH", "Batcher"]
