"""One run as a worker thread executes it: which interpreter, the compute slot, early outputs.

Call tree::

    run_job(job, server=, residents=, lender=, send_part=)        in a worker thread
     job_values(job, ...)             the values (a batch's check runs this alone per session)
      pool.pinned(consts)
        check inputs
        _stage_hooks(job, ...)        a run with stages:
          get_input(pos)                inline, or Inbound.wait(pos) with the compute slot lent out
          on_output(i, value)           host copy -> send_part(...) on the event loop, per fetch
                                        position, for outputs final before the last stage
        _executor.run_graph(...)         the one path: private constants, (Staged)Interpreter, in
                                      device.compute
          after every node: job.cancel.check()   the client cancelled: RunCancelledError, and the
                                                 values, the slot and the thread are let go
        check_untouched(...)                a shared constant that changed anyway: the run fails
     job_result(job, values, ...)     keep what it keeps (a batch packs each session's rows so)
      -> JobResult: handles of kept values, their metas, values still to send, parts sent, timeline
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import trio

from genie._errors import GenieError, RemoteExecutionError
from genie.graph import Graph, Node, StageSchedule, TensorMeta, encode_meta
from genie.server._executor import run_graph, unshared
from genie.server._executor import written_sources as written_sources  # _requests derives writes by it
from genie.server._inbound import Inbound
from genie.server._residency import Residents
from genie.server._staged import Timeline
from genie.transport import RunCancelledError

if TYPE_CHECKING:
    from genie.server._serve import Server


@dataclass
class Job:
    """One run, as the worker thread needs it."""

    id: int
    graph: Graph
    inputs: list  # tensors; None where a streamed input has not arrived yet
    consts: list[str]
    fetch: list[int]
    keep: list[int]
    written: list[str]  # digests of constants the program writes to, derived by written_sources
    schedule: StageSchedule | None
    layout: list[list[int]] | None  # node ids per stage, from ``schedule.check(graph)``
    inbound: Inbound | None
    trace: bool
    received: tuple[int, int] = (0, 0)  # when the run frame's first and last bytes were read
    send_log: list | None = None  # [name, start, end] of its parts' sends, filled by the send task
    cancel: Cancel | None = None
    names: list[int] | None = None  # the client's handles for the kept values (else ours)


class Cancel:
    """A run's cancellation: set on the event loop when the client sends ``cancel``; the worker thread
    checks it between nodes (a flag read costs nothing next to an op), and ``scope`` ends the run's
    waits on the event loop (for the compute slot, for sends to finish)."""

    def __init__(self) -> None:
        self.requested = False
        self.scope = trio.CancelScope()

    def set(self) -> None:
        self.requested = True
        self.scope.cancel()

    def check(self, node: Node | None = None) -> None:
        """Raise RunCancelledError if cancelled; an Interpreter's ``on_node`` (after each node)."""
        if self.requested:
            where = f" (stopped after node {node.id})" if node is not None else ""
            raise RunCancelledError(f"the client cancelled this run{where}")


@dataclass
class JobResult:
    handles: list[int]
    metas: list
    fetched: list[torch.Tensor]  # values of the fetch positions not sent early
    early: list[int]  # fetch positions already sent as parts
    timeline: dict | None


class Lender:
    """Holds a compute slot for one run, and lends it out while the run waits for a streamed input:
    a slow upload must not stall other connections' programs (on a GPU there is one slot)."""

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self.limiter = limiter
        self.held = False

    async def acquire(self) -> None:
        await self.limiter.acquire_on_behalf_of(self)
        self.held = True

    def try_acquire(self) -> bool:
        """Take a slot if one is free now, without waiting."""
        try:
            self.limiter.acquire_on_behalf_of_nowait(self)
        except trio.WouldBlock:
            return False
        self.held = True
        return True

    def release(self) -> None:
        if self.held:
            self.limiter.release_on_behalf_of(self)
            self.held = False

    def lend(self) -> Callable[[], None]:
        """In the worker thread: give the slot back now; the returned function takes it again."""
        trio.from_thread.run_sync(self.release)
        return lambda: trio.from_thread.run(self.acquire)


def run_job(job: Job, *, server: Server, residents: Residents, lender: Lender | None,
            send_part: Callable[[int, int, torch.Tensor], None]) -> JobResult:
    """Run (by ``_executor.run_graph``, the one path); keep what is kept; say what is left to send."""
    values, early, tl = job_values(job, server=server, residents=residents, lender=lender,
                                   send_part=send_part)
    return job_result(job, values, server=server, residents=residents, early=early, timeline=tl)


def job_values(job: Job, *, server: Server, residents: Residents, lender: Lender | None,
               send_part: Callable[[int, int, torch.Tensor], None],
               ) -> tuple[list, list[int], Timeline | None]:
    """The run's output values, the fetch positions already sent as parts, its timeline."""
    t0 = time.perf_counter()
    with server.pool.pinned(job.consts):
        check_job(job)
        versions = {d: server.pool[d]._version for d in dict.fromkeys(job.consts)}
        early: list[int] = []
        hooks = _stage_hooks(job, server, lender, send_part, early) if job.schedule is not None else {}
        try:
            values, tl = run_graph(job.graph, job.inputs, device=server.device.device, constants=server.pool,
                                 residents=residents, schedule=job.schedule, layout=job.layout,
                                 written=job.written, meter=job.trace,
                                 on_node=job.cancel.check if job.cancel is not None else None,
                                 compute=server.device.compute, tiers=server.tiers, **hooks)
        finally:
            check_untouched(server.pool, versions)
    server.stats["compute_seconds"] += time.perf_counter() - t0
    return values, early, tl


def job_result(job: Job, values: Sequence[torch.Tensor], *, server: Server, residents: Residents,
               early: Collection[int] = (), timeline: Timeline | None = None) -> JobResult:
    """Keep what the run keeps (its handles), and the values still to send."""
    handles = residents.keep(unshared([values[i] for i in job.keep], server.pool, job.consts), job.names)
    metas = [encode_meta(TensorMeta.of(values[i])) for i in job.keep]
    fetched = [values[i] for p, i in enumerate(job.fetch) if p not in early]
    wire = None
    if job.trace and timeline is not None:
        receives = [["receive run", *job.received], *(job.inbound.received if job.inbound else [])]
        wire = {**timeline.to_wire(), "receives": receives,
                "sends": job.send_log if job.send_log is not None else []}
    return JobResult(handles, metas, fetched, list(early), wire)


def _stage_hooks(job: Job, server: Server, lender: Lender | None,
                 send_part: Callable[[int, int, torch.Tensor], None], early: list[int]) -> dict:
    """A staged run's hooks: streamed inputs waited for with the compute slot lent out, and outputs
    final before the last stage sent as parts (their fetch positions added to ``early``)."""
    assert job.schedule is not None
    device, inbound = server.device, job.inbound
    parts = early_fetches(job)

    def get_input(pos: int) -> torch.Tensor:
        t = job.inputs[pos]
        if t is None:
            assert inbound is not None
            t = inbound.wait(pos, lender.lend if lender is not None else None)
            try:
                job.graph.check_input(pos, t)
            except TypeError as e:
                raise RemoteExecutionError(str(e), op="genie.input") from e
        return t

    def on_output(i: int, value: torch.Tensor) -> None:
        (host,) = device.to_host([value])
        for p in parts[i]:
            trio.from_thread.run_sync(send_part, job.id, p, host)
            early.append(p)

    return {"get_input": get_input, "on_output": on_output, "early": parts}


def check_job(job: Job) -> None:
    """Before a run computes: its cancellation (cancelled while it waited for the slot, or for its
    batch), then its given inputs, a bad one named as the client's fault."""
    if job.cancel is not None:
        job.cancel.check()
    try:
        check_given_inputs(job.graph, job.inputs)
    except (TypeError, GenieError) as e:
        raise RemoteExecutionError(str(e), op="genie.input") from e


def early_fetches(job: Job) -> dict[int, list[int]]:
    """A staged run's outputs final before its last stage, each with its fetch positions: what it
    sends as parts (none: the run is its program, whatever its stages)."""
    parts: dict[int, list[int]] = {}
    if job.schedule is not None:
        last = job.schedule.n_stages - 1
        for p, i in enumerate(job.fetch):
            if job.schedule.ready[i] < last:
                parts.setdefault(i, []).append(p)
    return parts


def check_given_inputs(graph: Graph, inputs: list) -> None:
    """Like ``graph.check_inputs``, but a hole (a streamed input still arriving) is checked later."""
    if len(inputs) != len(graph.inputs):
        raise TypeError(f"graph takes {len(graph.inputs)} inputs, got {len(inputs)}")
    for pos, t in enumerate(inputs):
        if t is not None:
            graph.check_input(pos, t)


def check_untouched(pool: Mapping[str, torch.Tensor], versions: dict[str, int]) -> None:
    """Defense in depth: a shared constant whose version counter moved during the run was written
    by an op the schema analysis did not predict (this run's or a concurrent one's). Either way
    values read from it may be wrong: the run fails, and the constant is dropped from the pool so
    that the next run that needs it gets it uploaded afresh."""
    changed = [d for d, v in versions.items() if d in pool and pool[d]._version != v]
    if not changed:
        return
    for d in changed:
        pool.discard(d)  # type: ignore[attr-defined]
    raise RemoteExecutionError(
        f"{len(changed)} shared constant(s) were written in place during this run by an op whose "
        "writes its schema does not declare; they were dropped from the server and will be uploaded "
        "again (a genie server bug: report the program)", op="genie.const")
