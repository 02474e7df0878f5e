"""What each request of one connection does, once the connection's work task admits it.

Call tree (``ConnectionHandler.work_loop`` calls ``REQUESTS[kind](conn, msg)``, in arrival order)::

    on_has, on_upload, on_stats        answered at once; an upload's digests are checked
    on_free, on_fetch                  a ticket (``_order``: which earlier requests it waits for), and
                                       the Pending rest of the work when it must wait
    on_run                             its frees first; then _admit_run:
      conn.reader.read(msg)            the graph (``_reader``: bytes or a filled template slot)
      _bind_inputs, _store_constants   inputs by position (streamed ones are holes); inline constants
      check_names, order.admit         the handles it names; its ticket
    -> Pending(_run)                   in a task of its own: wait for the ticket, then _execute:
      Batcher.run                      a replayed program's run: in a batch with the same program's
                                       other ready runs, from any connection (``_batch``); else
      _compute(run_job)                in a worker thread holding a compute slot and its predicted
                                       peak; a tiny run (``_inline.runs_inline``: CPU, no stages,
                                       few nodes and bytes, proven from the graph) on the event
                                       loop instead, holding the same
      -> the result message            (the handler sends it)

A cancelled run stops at its next node (a staged run: node or stage) boundary; its reply is an
error of kind ``cancelled``. Field types were checked by the protocol when the frame arrived; what
is checked here is what the values mean (ranges, handles, digests).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import trio

from genie._errors import GenieError, RemoteProtocolError, WeightsError
from genie.graph import CONST, RESIDENT, SOURCE_OPS, Graph, content_digest
from genie.server._inbound import Inbound
from genie.server._inline import confirm, runs_inline
from genie.server._job import Cancel, Job, JobResult, Lender, run_job, written_sources
from genie.server._order import Ticket
from genie.server._peers import on_lend, on_pull
from genie.transport import Message, RunCancelledError

if TYPE_CHECKING:
    from genie.server._handler import ConnectionHandler

INLINE_BYTES = 1 << 20  # a constant this small is checked and stored on the event loop
CONFIRM_INLINE = 4  # nodes of a tiny run confirmed on the meta device on the loop (see _inline)


@dataclass
class Pending:
    """An admitted request that goes on in a task of its own: its ticket, and the work left."""

    ticket: Ticket
    work: Callable[[], Awaitable[Message | None]]




async def on_has(conn: ConnectionHandler, msg: Message) -> Message:
    """Which of the digests the server lacks: neither held nor in its weights store."""
    digests = msg["digests"]
    store = conn.server.store
    missing = conn.server.pool.missing(digests)
    if store is not None:
        missing = [d for d in missing if not store.known(d)]
    return Message("have", {"id": msg["id"], "missing": missing})


async def on_weights(conn: ConnectionHandler, msg: Message) -> Message:
    """The tensors of a checkpoint in the weights store, by name: indexing a file reads it whole
    (once; then its sidecar answers), so it runs in a worker thread."""
    store = conn.server.store
    if store is None:
        raise WeightsError(f"weights {msg['name']!r:.200}: this server has no weights store (start it "
                           "with genie serve --weights DIR)")
    tensors = await trio.to_thread.run_sync(store.tensors, msg["name"])
    return Message("index", {"id": msg["id"], "tensors": [t.to_wire() for t in tensors]})


async def load_stored(conn: ConnectionHandler, digests: list[str]) -> None:
    """Bring the constants a run names that only the weights store holds into the pool (read and
    digest-checked in a worker thread; counted against the memory limit like any constant)."""
    server = conn.server
    store = server.store
    if store is None:
        return
    for d in server.pool.missing(digests):
        if store.known(d):
            host = await trio.to_thread.run_sync(store.load, d)
            if host is not None:
                await trio.to_thread.run_sync(functools.partial(server.pool.put, d, host,
                                                                server.device.to_device))


async def on_upload(conn: ConnectionHandler, msg: Message) -> Message:
    digests = msg["digests"]
    tensors = expect_tensors(msg.buffers, len(digests), "upload")
    await _store_constants(conn, digests, tensors)
    return Message("done", {"id": msg["id"]})


async def _store_constants(conn: ConnectionHandler, digests: list[str], tensors: list[torch.Tensor]) -> None:
    pool, device = conn.server.pool, conn.server.device
    for d, t in zip(digests, tensors, strict=True):
        if d in pool:
            continue
        if t.numel() * t.element_size() <= INLINE_BYTES and not device.cuda:
            _put(conn, d, t)  # a token id, a scalar: not worth a worker thread
        else:
            await trio.to_thread.run_sync(_put, conn, d, t)


def _put(conn: ConnectionHandler, digest: str, t: torch.Tensor) -> None:
    """Store a received constant. It never stays a view of the frame it came in (a 4-byte constant
    would hold a whole receive block, uncounted): on CUDA it is copied to the device anyway; on the
    CPU a constant that is most of its frame's payload is adopted as it is (the frame's bytes
    become the constant's), any other is copied."""
    if content_digest(t) != digest:  # else a client could shadow another's weights
        raise RemoteProtocolError(f"constant {digest[:16]}... does not have that content digest")
    device = conn.server.device
    if device.cuda:
        conn.server.pool.put(digest, t, device.to_device)
    else:
        conn.server.pool.put(digest, t, _own_copy, adopt=True)
    conn.server.stats["uploads"] += 1


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)



async def on_free(conn: ConnectionHandler, msg: Message) -> Pending | None:
    return _free(conn, msg["handles"])


def _free(conn: ConnectionHandler, handles: list[int]) -> Pending | None:
    """Drop ``handles`` once the earlier requests that read or keep them have ended: at once when
    none is left, else in a task (the Pending)."""
    ticket = conn.order.admit(0, set(), frees=handles)
    if not ticket.after:
        conn.residents.free(handles)
        conn.order.finish(ticket, True)
        return None

    async def work() -> None:
        await ticket.wait()
        conn.residents.free(handles)

    return Pending(ticket, work)


async def on_stats(conn: ConnectionHandler, msg: Message) -> Message:
    return Message("report", {"id": msg["id"], "stats": conn.server.report()})


async def on_fetch(conn: ConnectionHandler, msg: Message) -> Pending:
    handle = msg["handle"]
    keys, producers = conn.order.reads([handle])
    ticket = conn.order.admit(msg["id"], keys, producers)

    async def work() -> Message:
        await ticket.wait()  # the run keeping it, and earlier writers of its storage
        t = conn.residents.get(handle)
        if t is None:
            raise GenieError(f"handle {handle} is not resident on this connection")
        device = conn.server.device
        host = await trio.to_thread.run_sync(device.to_host, [t]) if device.cuda else [t]
        return Message("result", {"id": msg["id"], "handles": [], "metas": []}, host)

    return Pending(ticket, work)


async def on_run(conn: ConnectionHandler, msg: Message) -> Pending:
    """Admit a run (its frees first, as the client sent them before it); its task computes."""
    req_id = msg["id"]
    inbound = conn.inbound.get(req_id) if "stream" in msg.fields else None
    cancel = conn.cancels.setdefault(req_id, Cancel())
    try:
        if "frees" in msg.fields:
            freeing = _free(conn, msg["frees"])
            if freeing is not None:
                conn.start(freeing, None)  # one per run at most: bounded by --max-runs too
        job, peak, ticket, writes = await _admit_run(conn, msg, inbound, cancel)
    except BaseException as e:
        if isinstance(e, RunCancelledError):
            conn.server.stats["cancelled"] += 1
        forget_names(conn, msg)
        _run_ended(conn, req_id, cancel, inbound)
        raise
    return Pending(ticket, functools.partial(_run, conn, job, peak, ticket, writes))


async def _admit_run(conn: ConnectionHandler, msg: Message, inbound: Inbound | None,
                     cancel: Cancel) -> tuple[Job, int, Ticket, bool]:
    """In arrival order: decode the plan (slot state follows the order), bind the inputs, store
    the inline constants (a later run may name them), check the handles and take a ticket."""
    graph, n_graph, schedule, layout, peak = await conn.reader.read(msg)
    if inbound is not None and schedule is None:
        raise RemoteProtocolError("run message: streamed inputs need a stage schedule")
    inputs = _bind_inputs(conn, msg, n_graph, inbound)
    digests = msg["consts"]
    await _store_constants(conn, digests, expect_tensors(msg.buffers[n_graph + msg["inputs"]:], len(digests),
                                                  "run"))
    cancel.check()  # after the frees, the template slot and the constants the client counts as sent
    fetch, keep = msg["fetch"], msg["keep"]
    if any(not 0 <= i < len(graph.outputs) for i in (*fetch, *keep)):
        raise RemoteProtocolError("run message: fetch/keep index out of range")
    names = conn.residents.check_names(msg.get("names"), len(keep), conn.order.live)
    keys, producers = conn.order.reads(n.args[0] for n in graph.nodes if n.op == RESIDENT)
    consts = [n.args[0] for n in graph.nodes if n.op == CONST]
    written, writes_residents = written_sources(graph)
    job = Job(msg["id"], graph, inputs, consts, fetch, keep, written, schedule, layout, inbound,
              bool(msg.get("trace")) and schedule is not None, cancel=cancel, names=names)
    if job.trace:
        job.send_log = conn.send_logs[job.id] = []
        job.received = (msg.started_ns, msg.received_ns)
    ticket = conn.order.admit(job.id, keys, producers, names=names or ())
    if ticket.after:
        conn.server.stats["runs_ordered"] += 1  # waits for an earlier run of this connection
    return job, peak, ticket, writes_residents


def forget_names(conn: ConnectionHandler, msg: Message) -> None:
    """A run failed before it was admitted: a later run reading a handle it named learns so."""
    names = msg.get("names") or []
    if isinstance(names, list) and len(names) <= len(msg["keep"]) and all(type(h) is int for h in names):
        for h in names:
            if not conn.order.live(h):
                conn.order.forget(h, msg["id"])


def _run_ended(conn: ConnectionHandler, req_id: int, cancel: Cancel, inbound: Inbound | None) -> None:
    if conn.cancels.get(req_id) is cancel:
        del conn.cancels[req_id]
    if inbound is not None:
        inbound.run_done = True
        conn.settle(req_id)


async def _run(conn: ConnectionHandler, job: Job, peak: int, ticket: Ticket,
               writes_residents: bool) -> Message:
    """A run's task: wait for the earlier runs it depends on, compute, build the reply."""
    assert job.cancel is not None
    t0 = time.perf_counter()
    try:
        with job.cancel.scope:  # the event loop's waits (earlier runs, the slot, sends) end on cancel
            return await _execute(conn, job, peak, ticket, writes_residents)
        raise RunCancelledError(f"run {job.id} was cancelled by the client")
    except RunCancelledError:
        conn.server.stats["cancelled"] += 1
        conn.server.stats["cancelled_seconds"] += time.perf_counter() - t0  # until it stopped
        raise
    finally:
        _run_ended(conn, job.id, job.cancel, job.inbound)


async def _execute(conn: ConnectionHandler, job: Job, peak: int, ticket: Ticket,
                   writes_residents: bool) -> Message:
    server = conn.server
    await ticket.wait()
    assert job.cancel is not None
    job.cancel.check()
    if writes_residents:  # a resident being sent must not change under the send
        while conn.in_flight:
            await conn.sent.wait()
    await load_stored(conn, job.consts)
    device = server.device
    # on CUDA, staging and copying back run beside other connections' compute (copy stream);
    # on the CPU both are free, so one worker thread does the whole run
    if device.cuda:
        given = [t for t in job.inputs if t is not None]
        staged = iter(await trio.to_thread.run_sync(device.stage, given))
        job.inputs = [None if t is None else next(staged) for t in job.inputs]
    # a replayed program's run joins a batch of the same program's ready runs (``_batch``)
    out = await server.batcher.run(conn, job, peak) if server.batcher is not None else None
    if out is None:
        run = functools.partial(run_job, job, server=server, residents=conn.residents,
                                send_part=functools.partial(_queue_part, conn))
        out = await _compute(conn, run, job, peak)
    fetched = out.fetched
    if device.cuda:
        fetched = await trio.to_thread.run_sync(device.to_host, fetched)
    server.stats["runs"] += 1
    conn.runs_done += 1
    fields = {"id": job.id, "handles": out.handles, "metas": out.metas}
    if out.early:
        fields["early"] = out.early
    if out.timeline is not None:
        fields["timeline"] = out.timeline
    return Message("result", fields, fetched)


def _bind_inputs(conn: ConnectionHandler, msg: Message, n_graph: int,
                 inbound: Inbound | None) -> list[torch.Tensor | None]:
    """The run's inputs by position: a streamed one is a hole, filled as its frame lands."""
    n_in, n_consts = msg["inputs"], len(msg["consts"])
    bufs = msg.buffers[n_graph:]
    if type(n_in) is not int or n_in < 0 or len(bufs) != n_in + n_consts:
        raise RemoteProtocolError(f"run message: {len(bufs)} buffers for {n_in} inputs and "
                                  f"{n_consts} constants")
    inputs: list[torch.Tensor | None] = list(expect_tensors(bufs[:n_in], n_in, "run"))
    if inbound is not None:
        total = n_in + len(inbound.positions)
        if any(p >= total for p in inbound.positions):
            raise RemoteProtocolError(f"run message: streamed input position out of range ({total} "
                                      "inputs)")
        given = iter(inputs)
        inputs = [None if p in inbound.positions else next(given) for p in range(total)]
    return inputs


async def _compute(conn: ConnectionHandler, run: Callable[..., JobResult], job: Job, peak: int) -> JobResult:
    """``run`` holding a compute slot, with the job's predicted peak reserved under the memory
    limit (its constants pinned first, so making room cannot evict them): in a worker thread, or
    on the event loop when it is tiny (see ``_inline``) and a slot is free at once."""
    server = conn.server
    if (not server.device.cuda and job.schedule is None and all(n.op in SOURCE_OPS for n in job.graph.nodes)
            and sum(t.nbytes for t in job.inputs if t is not None) <= INLINE_BYTES):  # (keep may copy)
        return run(lender=None)  # nothing to compute (``.cpu()`` of a kept value): no thread needed
    with server.pool.pinned(job.consts), server.pool.run_reservation(peak):
        lender = Lender(server.compute_limiter)
        inline, unconfirmed = runs_inline(job, server.device.cuda, server.pool, conn.residents)
        if 0 < len(unconfirmed) <= CONFIRM_INLINE:  # a few nodes' outputs not known from their
            confirm(job.graph, unconfirmed)  # inputs yet: meta kernels find out (no real sizes)
            inline, unconfirmed = runs_inline(job, server.device.cuda, server.pool, conn.residents)
        if unconfirmed:  # more: the worker thread finds out after the run, for next time
            run = functools.partial(_confirming, run, job.graph, unconfirmed)
        if inline and lender.try_acquire():
            # a thread hop costs more than the run (~100 us each way under load); a tiny run
            # blocks the loop for less than that, and holds the slot like any other run
            try:
                server.stats["runs_inline"] += 1
                return run(lender=None)
            finally:
                lender.release()
        await lender.acquire()
        try:
            # runs have their own thread limiter, sized so that stalled runs (waiting for a
            # streamed input, holding their thread) cannot starve the others (see Server)
            return await trio.to_thread.run_sync(functools.partial(run, lender=lender),
                                                 limiter=server.run_threads)
        finally:
            lender.release()


def _queue_part(conn: ConnectionHandler, req_id: int, pos: int, host: torch.Tensor) -> None:
    if not conn.closing:
        conn.in_flight += 1
        conn.queue(Message("part", {"id": req_id, "output": pos}, [host]))


# each answers at once (a reply, or None), or hands back the Pending rest of its work
REQUESTS: dict[str, Callable[[ConnectionHandler, Message], Awaitable[Message | Pending | None]]] = {
    "has": on_has,
    "upload": on_upload,
    "run": on_run,
    "fetch": on_fetch,
    "free": on_free,
    "stats": on_stats,
    "weights": on_weights,
    "lend": on_lend,  # server to server (``_peers``)
    "pull": on_pull,
}


def _confirming(run: Callable[..., JobResult], graph: Graph, nodes: list, **kw: object) -> JobResult:
    """``run`` in its worker thread, then confirm ``nodes`` there (meta kernels can take a
    millisecond): the next run of these nodes may go on the event loop."""
    out = run(**kw)
    confirm(graph, nodes)
    return out


def expect_tensors(bufs: list, n: int, what: str) -> list[torch.Tensor]:
    if len(bufs) != n or not all(isinstance(b, torch.Tensor) for b in bufs):
        raise RemoteProtocolError(f"{what} message: expected {n} tensors")
    return bufs
