"""One run as a worker thread executes it: which interpreter, the compute slot, early outputs.

Call tree::

    run_job(job, server=, residents=, lender=, send_part=)        in a worker thread
      _interpreter(job, ...)          plain Interpreter, or StagedInterpreter when the run has stages:
        get_input(pos)                  inline, or Inbound.wait(pos) with the compute slot lent out
        on_output(i, value)             host copy -> send_part(...) on the event loop, per fetch
                                        position, for outputs final before the last stage
      pool.pinned(consts)             constants the program writes: its own copies
        check inputs; device.compute(interp.run)
      -> JobResult: handles of kept values, their metas, values still to send, parts sent, timeline
"""

from __future__ import annotations

import time
from collections import ChainMap
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import trio

from genie._errors import GenieError, RemoteExecutionError
from genie.graph import CONST, RESIDENT, Graph, Node, StageSchedule, TensorMeta
from genie.graph._wire import encode_meta
from genie.server._inbound import Inbound
from genie.server._interpreter import Interpreter
from genie.server._residency import Residents
from genie.server._staged import StagedInterpreter

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
    written: list[str]  # digests of constants the program writes to
    schedule: StageSchedule | None
    layout: list[list[int]] | None  # node ids per stage, from ``schedule.check(graph)``
    inbound: Inbound | None
    trace: bool
    received: tuple[int, int] = (0, 0)  # when the run frame's first and last bytes were read
    send_log: list | None = None  # [name, start, end] of its parts' sends, filled by the send task


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
    """Run; keep what is kept; say what is left to send."""
    t0 = time.perf_counter()
    interp, early = _interpreter(job, server, residents, lender, send_part)
    with server.pool.pinned(job.consts):
        if job.written:  # constants are shared by every client: a program writes to its own copy
            interp.constants = ChainMap({d: server.pool[d].clone() for d in job.written}, server.pool)
        try:
            check_inputs(job.graph, job.inputs)
        except (TypeError, GenieError) as e:
            raise RemoteExecutionError(str(e), op="genie.input") from e
        values = server.device.compute(lambda: interp.run(job.inputs))
    server.stats["compute_seconds"] += time.perf_counter() - t0
    handles = residents.keep([values[i] for i in job.keep])
    metas = [encode_meta(TensorMeta.of(values[i])) for i in job.keep]
    fetched = [values[i] for p, i in enumerate(job.fetch) if p not in early]
    timeline = None
    if job.trace and isinstance(interp, StagedInterpreter):
        receives = [["receive run", *job.received], *(job.inbound.received if job.inbound else [])]
        timeline = {**interp.timeline.to_wire(), "receives": receives,
                    "sends": job.send_log if job.send_log is not None else []}
    return JobResult(handles, metas, fetched, early, timeline)


def _interpreter(job: Job, server: Server, residents: Residents, lender: Lender | None,
                 send_part: Callable[[int, int, torch.Tensor], None]) -> tuple[Interpreter, list[int]]:
    """The interpreter for ``job``, and the list that fetch positions sent early are added to."""
    graph, device, early = job.graph, server.device, []
    if job.schedule is None:
        return Interpreter(graph, device=device.device, constants=server.pool, residents=residents), early
    inbound = job.inbound
    parts: dict[int, list[int]] = {}  # output -> its fetch positions, if final before the last stage
    last = job.schedule.n_stages - 1
    for p, i in enumerate(job.fetch):
        if job.schedule.ready[i] < last:
            parts.setdefault(i, []).append(p)

    def get_input(pos: int) -> torch.Tensor:
        t = job.inputs[pos]
        if t is None:
            assert inbound is not None
            t = inbound.wait(pos, lender.lend if lender is not None else None)
            try:
                graph.check_input(pos, t)
            except TypeError as e:
                raise RemoteExecutionError(str(e), op="genie.input") from e
        return t

    def on_output(i: int, value: torch.Tensor) -> None:
        (host,) = device.to_host([value])
        for p in parts[i]:
            trio.from_thread.run_sync(send_part, job.id, p, host)
            early.append(p)

    interp = StagedInterpreter(graph, job.schedule, device=device.device, constants=server.pool,
                               residents=residents, get_input=get_input, on_output=on_output, early=parts,
                               meter=job.trace, layout=job.layout)
    return interp, early


def check_inputs(graph: Graph, inputs: list) -> None:
    """Like ``graph.check_inputs``, but a hole (a streamed input still arriving) is checked later."""
    if len(inputs) != len(graph.inputs):
        raise TypeError(f"graph takes {len(graph.inputs)} inputs, got {len(inputs)}")
    for pos, t in enumerate(inputs):
        if t is not None:
            graph.check_input(pos, t)


def written_sources(graph: Graph) -> tuple[list[str], bool]:
    """(digests of constants the graph writes to, whether it writes to a resident value)."""
    owner: dict[int, Node] = {}
    for n in graph.nodes:
        if n.op in (CONST, RESIDENT):
            for sid in n.storages:
                owner[sid] = n
    consts, residents = [], False
    for n in graph.nodes:
        for sid in n.writes:
            src = owner.get(sid)
            if src is not None and src.op == CONST:
                consts.append(src.args[0])
            elif src is not None:
                residents = True
    return list(dict.fromkeys(consts)), residents
