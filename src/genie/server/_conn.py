"""One client connection: a receive task, a work task and a send task, joined by channels.

Call tree::

    Connection(server, stream).serve()     stream: a trio socket, or a trio.SSLStream (TLS)
      handshake()                       (TLS handshake) hello -> token check -> welcome (or error + close)
      receive_loop()                    frames -> work queue, in order; ping answered at once;
                                        a run's streamed ``input`` frames go straight to its Inbound;
                                        ``cancel`` at once: the run's Cancel is set (see on_run)
      work_loop()                       one message at a time, in the order received:
        HANDLERS[kind](msg)               has, upload, run, fetch, free, stats
          run: plan (graph | slot, its corrections in the header or two vectors) -> Graph; inline
               constants (digest checked); then, in a worker thread: stage inputs, compute, keep;
               a tiny run (``_tiny``: CPU, no stages, few nodes and bytes) runs on the event loop
               instead, holding a compute slot and its memory reservation like any other
          run with stages: StagedInterpreter; a streamed input is waited for (the compute slot
               lent meanwhile) when its first reader's stage starts; each fetched output final
               before the end goes to the send task as a ``part`` when its stage ends
          run cancelled: the worker stops at its next node (a staged run: node or stage) boundary,
               waits on the event loop end, its inputs and slot are let go; reply: error ``cancelled``
      send_loop()                       replies -> bytes -> socket (a small reply with nothing
                                        queued before it is written by the work task at once)
      finally: residents freed; a run still waiting for streamed inputs is failed

Work is ordered per connection (a free queued after a run must not overtake it) but runs in worker
threads, so a long compute never stops the event loop from serving other connections; only a run
whose cost is bounded by a few KiB touched runs on the loop, where a thread hop would cost more. A frame that
breaks the protocol closes this connection only; an error inside a run becomes an ``error`` reply.

Results are sent from the tensors themselves, without a copy. So a run that writes to a resident
value waits until no result is still being sent, and a run that writes to a constant (shared by
every client under its digest) writes to its own copy.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import math
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import trio

from genie._errors import (
    AuthenticationError,
    GenieError,
    ProtocolError,
    RemoteMemoryError,
    RemoteProtocolError,
)
from genie.graph import CONST, RESIDENT, SOURCE_OPS, Graph, StageSchedule, content_digest
from genie.graph._template import Template, apply, fix_lists, predict, split
from genie.graph._wire import graph_from_bytes
from genie.server._inbound import Inbound
from genie.server._job import Cancel, Job, JobResult, Lender, run_job, written_sources
from genie.server._memory import check_sizes
from genie.server._memory import predict as predict_peak
from genie.server._residency import MissingPlanError, Residents
from genie.transport import (
    GONE,
    SERVER,
    VERSION,
    Message,
    Protocol,
    RunCancelledError,
    close_now,
    error_message,
    receive_message,
    send_now,
    send_parts,
    writable_now,
)

if TYPE_CHECKING:
    from genie.server._serve import Server

INLINE_BYTES = 1 << 20  # a constant this small is checked and stored on the event loop
HEAVY_BYTES = 64 << 10  # a graph this big is decoded in a worker thread, off the event loop
HEAVY_FILLS = 1024  # ... and a template fill with this many corrections
SMALL_REPLY = 32 << 10  # payload bytes of a reply written at once by the work task (see _reply)
TINY_NODES = 32  # a run this small (in nodes and in bytes touched) runs on the event loop
TINY_BYTES = 64 << 10
# a run's graph, how many buffers described it, its stage schedule and layout, its predicted peak
_Decoded = tuple[Graph, int, "StageSchedule | None", "list[list[int]] | None", int]


@dataclass
class Slot:
    """A template this connection's client registered, and the last two vectors that filled it."""

    template: Template
    last: np.ndarray
    prev: np.ndarray
    strs: list[str]
    graph: Graph
    filled: bool = True  # filled once here: later fills rebuild only what changed (cheap)


class Connection:
    def __init__(self, server: Server, stream: trio.socket.SocketType | trio.SSLStream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        lim = server.limits
        self.proto = Protocol(SERVER, max_frame=lim.max_frame, max_header=lim.max_header,
                              max_buffers=lim.max_buffers, allocate=self._allocate)
        self.residents = Residents(server.pool)
        self.slots: dict[int, Slot] = {}
        self.outbox, self._outbox_recv = trio.open_memory_channel[Message | memoryview](math.inf)
        self._queued = 0  # outbox items not yet written: a reply may skip the queue only when 0
        self._raw = writable_now(stream)
        self.work, self._work_recv = trio.open_memory_channel[Message](64)
        self.work_scope = trio.CancelScope()
        self._in_flight = 0  # result messages queued or being written
        self._sent = trio.Event()  # set (and replaced) each time that count drops to zero
        self.inbound: dict[int, Inbound] = {}  # run id -> its streamed inputs
        self.cancels: dict[int, Cancel] = {}  # run id -> its Cancel, from its frame until it ends
        self._send_logs: dict[int, list] = {}  # traced run id -> [name, start, end] of its parts' sends
        self.greeted = False
        self.closing = False
        self._working = 0  # handlers in progress (the idle watch leaves a busy connection alone)
        self._active = trio.current_time()  # when a frame last arrived or work last finished

    # -- lifetime -------------------------------------------------------------------------------
    async def serve(self) -> None:
        try:
            with trio.move_on_after(self.server.hello_timeout):
                if not await self.handshake():
                    return
            if not self.greeted:
                return
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._guard, self.send_loop)
                nursery.start_soon(self._guard, self.work_loop)
                nursery.start_soon(self._guard, self.receive_loop)
                nursery.start_soon(self._guard, self.idle_watch)
        except GONE as e:
            self.log(f"connection lost: {e}")
        finally:
            self.residents.close()
            close_now(self.stream)

    async def _guard(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one of the three tasks; its end (or an I/O error) ends the connection."""
        try:
            await loop()
        except (ProtocolError, RemoteMemoryError) as e:  # a broken or too big frame: say so, close
            self.fatal(e)
            return
        except GONE as e:
            self.log(f"connection lost: {e}")
        self._nursery.cancel_scope.cancel()

    def _allocate(self, n: int) -> memoryview:
        """Memory for a frame's payload of ``n`` bytes, once its header is in: refused (before a
        byte of it is buffered) when it could never fit under the memory limit."""
        self.server.pool.admit_frame(n)
        return self.server.device.allocate(n)

    async def idle_watch(self) -> None:
        """End the connection once it has had nothing to do for the idle timeout (0: never)."""
        idle = self.server.limits.idle_timeout
        if idle <= 0:
            await trio.sleep_forever()
        while True:
            await trio.sleep_until(self._active + idle)
            if self._working or self._in_flight or self.inbound:
                self._active = trio.current_time()
            elif trio.current_time() >= self._active + idle:
                self.log(f"idle for {idle:g} s: closing")
                return

    def fatal(self, exc: BaseException, req_id: int = 0) -> None:
        """The peer broke the protocol: stop working, say why, close within a bounded time."""
        if self.closing:
            return
        self.closing = True
        self.log(f"closing: {exc}")
        self.work_scope.cancel()
        self._abort_inbound(exc)
        with contextlib.suppress(trio.ClosedResourceError):
            self._queue(error_message(req_id, exc))
            self.outbox.close()
        self._nursery.cancel_scope.deadline = trio.current_time() + 2

    def log(self, text: str) -> None:
        if self.server.verbose:
            print(f"genie serve: {self.peer}: {text}", file=sys.stderr, flush=True)

    async def handshake(self) -> bool:
        if isinstance(self.stream, trio.SSLStream):
            try:
                await self.stream.do_handshake()
            except trio.BrokenResourceError as e:  # not TLS (a plain client), or a TLS alert
                self.log(f"TLS handshake failed: {e.__cause__ or e}")
                return False
        try:
            msg = await receive_message(self.stream, self.proto)
        except RemoteProtocolError as e:
            self.log(f"bad greeting: {e}")
            return False
        if msg is None:
            return False
        expected = self.server.token
        if msg["version"] != VERSION:
            reply = error_message(0, RemoteProtocolError(f"server speaks version {VERSION}, client "
                                                         f"{msg['version']}"))
        elif expected and not hmac.compare_digest(msg["token"].encode(), expected.encode()):
            reply = error_message(0, AuthenticationError("bad token"))
        else:
            reply = Message("welcome", {"version": VERSION, "device": str(self.server.device),
                                        "max_frame": self.server.max_frame, "clock": time.perf_counter_ns()})
        await send_parts(self.stream, self.proto.send(reply))
        if reply.kind == "error":
            self.log(reply["message"])
            return False
        self.server.stats["connections"] += 1
        self.greeted = True
        return True

    # -- the three tasks ------------------------------------------------------------------------
    async def receive_loop(self) -> None:
        try:
            while not self.closing:
                msg = await receive_message(self.stream, self.proto)
                if msg is None:
                    return  # the client closed: nobody is left to answer
                self._active = trio.current_time()
                if msg.refused is not None:
                    self._refuse(msg, msg.refused)
                elif msg.kind == "ping":
                    self._queue(Message("pong", {"id": msg["id"]}))
                elif msg.kind == "input":
                    await self._on_input(msg)
                elif msg.kind == "cancel":
                    self._cancel(msg["id"])
                else:
                    if msg.kind == "run":
                        if "stream" in msg.fields:
                            self._expect_inputs(msg)
                        self.cancels[msg["id"]] = Cancel()
                    await self.work.send(msg)
            await trio.sleep_forever()  # fatal(): the send task finishes the conversation
        finally:  # no more frames: a run waiting for a streamed input must not wait forever
            self._abort_inbound(GenieError("the connection ended before this run's streamed inputs "
                                           "arrived"))

    def _refuse(self, msg: Message, exc: Exception) -> None:
        """A frame whose payload was refused at its header (the memory limit), so never buffered:
        its request fails at once, and the connection lives on."""
        if msg.kind == "input":  # its run fails when it waits for it
            inbound = self.inbound.get(msg["id"])
            if inbound is not None:
                inbound.abort(exc)
            return
        if msg.kind == "run" and "stream" in msg.fields:  # its inputs are still coming: drop them
            self._expect_inputs(msg)
            self.inbound[msg["id"]].run_done = True
            self.inbound[msg["id"]].abort(exc)
        if "id" in msg.fields:
            self._queue(error_message(msg["id"], exc))

    def _expect_inputs(self, msg: Message) -> None:
        req_id = msg["id"]
        if req_id in self.inbound:
            raise RemoteProtocolError(f"run {req_id}: a run with this id is still receiving inputs")
        self.inbound[req_id] = Inbound(_ints(msg["stream"], "stream"), self.server.limits.stream_timeout)

    async def _on_input(self, msg: Message) -> None:
        inbound = self.inbound.get(msg["id"])
        if inbound is None:
            raise RemoteProtocolError(f"input frame for run {msg['id']}, which streams no inputs")
        (t,) = _tensors(msg.buffers, 1, "input")
        if self.server.device.cuda:  # onto the device on the copy stream, beside running stages
            (t,) = await trio.to_thread.run_sync(self.server.device.stage, [t])
        inbound.arrive(msg["input"], t, msg.started_ns, msg.received_ns)
        self._settle(msg["id"])

    def _cancel(self, req_id: int) -> None:
        """The client gave up on run ``req_id``: stop it (queued, waiting or computing). Its streamed
        inputs all came before this frame (the client sends them first); they go with its Inbound.
        An id that is not a live run of this connection is ignored: it may have just finished."""
        cancel = self.cancels.get(req_id)
        if cancel is None:
            return
        cancel.set()
        inbound = self.inbound.pop(req_id, None)
        if inbound is not None:
            inbound.abort(RunCancelledError(f"run {req_id} was cancelled by the client"))

    def _settle(self, req_id: int) -> None:
        inbound = self.inbound.get(req_id)
        if inbound is not None and inbound.run_done and inbound.complete:
            del self.inbound[req_id]

    def _abort_inbound(self, exc: BaseException) -> None:
        for inbound in self.inbound.values():
            inbound.abort(exc)

    def _queue(self, msg: Message | memoryview) -> None:
        self._queued += 1
        self.outbox.send_nowait(msg)

    def _reply(self, msg: Message) -> None:
        """Send a reply: a small one at once from this task when nothing is queued before it (a
        pass of the loop saved; what the socket does not take goes first in the outbox), else
        through the send task. Sent at once, its bytes are copied out: no result stays in flight."""
        raw = self._raw
        if raw is None or self._queued or sum(_nbytes(b) for b in msg.buffers) > SMALL_REPLY:
            if msg.kind == "result" and msg.buffers:
                self._in_flight += 1  # fetched values may be residents: see on_run
            self._queue(msg)
            return
        if msg.kind in ("result", "error"):
            self._send_logs.pop(msg["id"], None)  # a traced result's timeline holds the list
        t0 = time.perf_counter_ns()
        rest = send_now(raw, self.proto.send(msg))
        self.server.stats["send_seconds"] += (time.perf_counter_ns() - t0) / 1e9
        if rest:
            self._queue(rest)

    async def send_loop(self) -> None:
        async for msg in self._outbox_recv:
            try:
                await self._send(msg)
            finally:
                self._queued -= 1
        # the outbox is closed only by fatal(): all is said, so returning ends the connection

    async def _send(self, msg: Message | memoryview) -> None:
        stats = self.server.stats
        if isinstance(msg, memoryview):  # the rest of a reply ``_reply`` began
            await send_parts(self.stream, [msg])
            return
        if msg.kind in ("result", "error"):
            self._send_logs.pop(msg["id"], None)  # a traced result's timeline holds the list
        t0 = time.perf_counter_ns()
        await send_parts(self.stream, self.proto.send(msg))
        t1 = time.perf_counter_ns()
        stats["send_seconds"] += (t1 - t0) / 1e9
        if msg.kind == "part" and msg["id"] in self._send_logs:
            self._send_logs[msg["id"]].append([f"send output {msg['output']}", t0, t1])
        if msg.kind in ("result", "part") and msg.buffers:
            self._in_flight -= 1
            if not self._in_flight:
                self._sent.set()
                self._sent = trio.Event()

    async def work_loop(self) -> None:
        with self.work_scope:
            async for msg in self._work_recv:
                req_id = msg.get("id", 0)
                self._working += 1
                try:
                    reply = await HANDLERS[msg.kind](self, msg)
                except ProtocolError as e:  # malformed content: answer, then close this connection
                    self.fatal(e, req_id)
                    break
                except Exception as e:
                    reply = error_message(req_id, e)
                finally:
                    self._working -= 1
                    self._active = trio.current_time()
                if reply is not None and not self.closing:
                    self._reply(reply)
        await trio.sleep_forever()  # fatal(): the send task finishes the conversation

    # -- handlers -------------------------------------------------------------------------------
    async def on_has(self, msg: Message) -> Message:
        digests = _strings(msg["digests"], "digests")
        return Message("have", {"id": msg["id"], "missing": self.server.pool.missing(digests)})

    async def on_upload(self, msg: Message) -> Message:
        digests = _strings(msg["digests"], "digests")
        tensors = _tensors(msg.buffers, len(digests), "upload")
        await self._store_constants(digests, tensors)
        return Message("done", {"id": msg["id"]})

    async def _store_constants(self, digests: list[str], tensors: list[torch.Tensor]) -> None:
        pool, device = self.server.pool, self.server.device
        for d, t in zip(digests, tensors, strict=True):
            if d in pool:
                continue
            if t.numel() * t.element_size() <= INLINE_BYTES and not device.cuda:
                self._put(d, t)  # a token id, a scalar: not worth a worker thread
            else:
                await trio.to_thread.run_sync(self._put, d, t)

    def _put(self, digest: str, t: torch.Tensor) -> None:
        if content_digest(t) != digest:  # else a client could shadow another's weights
            raise RemoteProtocolError(f"constant {digest[:16]}... does not have that content digest")
        self.server.pool.put(digest, t, self.server.device.to_device)
        self.server.stats["uploads"] += 1

    async def on_free(self, msg: Message) -> None:
        self.residents.free(_ints(msg["handles"], "handles"))

    async def on_stats(self, msg: Message) -> Message:
        return Message("report", {"id": msg["id"], "stats": self.server.report()})

    async def on_fetch(self, msg: Message) -> Message:
        t = self.residents.get(msg["handle"])
        if t is None:
            raise GenieError(f"handle {msg['handle']} is not resident on this connection")
        device = self.server.device
        host = await trio.to_thread.run_sync(device.to_host, [t]) if device.cuda else [t]
        return Message("result", {"id": msg["id"], "handles": [], "metas": []}, host)

    async def on_run(self, msg: Message) -> Message:
        req_id = msg["id"]
        inbound = self.inbound.get(req_id) if "stream" in msg.fields else None
        cancel = self.cancels.setdefault(req_id, Cancel())
        t0 = time.perf_counter()
        try:
            with cancel.scope:  # the event loop's waits (the compute slot, sends) end on cancel
                return await self._run(msg, inbound, cancel)
            raise RunCancelledError(f"run {req_id} was cancelled by the client")
        except RunCancelledError:
            self.server.stats["cancelled"] += 1
            self.server.stats["cancelled_seconds"] += time.perf_counter() - t0  # until it stopped
            raise
        finally:
            if self.cancels.get(req_id) is cancel:
                del self.cancels[req_id]
            if inbound is not None:
                inbound.run_done = True
                self._settle(req_id)

    async def _run(self, msg: Message, inbound: Inbound | None, cancel: Cancel) -> Message:
        server = self.server
        if "frees" in msg.fields:
            self.residents.free(_ints(msg["frees"], "frees"))
        graph, n_plan, schedule, layout, peak = await self._decode(msg)
        if inbound is not None and schedule is None:
            raise RemoteProtocolError("run message: streamed inputs need a stage schedule")
        inputs = self._bind_inputs(msg, n_plan, inbound)
        digests = _strings(msg["consts"], "consts")
        await self._store_constants(digests, _tensors(msg.buffers[n_plan + msg["inputs"]:], len(digests),
                                                      "run"))
        cancel.check()  # after the frees, the plan slot and the constants the client counts as sent
        fetch, keep = _ints(msg["fetch"], "fetch"), _ints(msg["keep"], "keep")
        if any(not 0 <= i < len(graph.outputs) for i in (*fetch, *keep)):
            raise RemoteProtocolError("run message: fetch/keep index out of range")
        for n in graph.nodes:
            if n.op == RESIDENT and n.args[0] not in self.residents:
                raise GenieError(f"handle {n.args[0]} is not resident on this connection "
                                 "(freed, or kept by another connection)")
        device = server.device
        consts = [n.args[0] for n in graph.nodes if n.op == CONST]
        written, writes_residents = written_sources(graph)
        if writes_residents:  # a resident being sent must not change under the send
            while self._in_flight:
                await self._sent.wait()
        # on CUDA, staging and copying back run beside other connections' compute (copy stream);
        # on the CPU both are free, so one worker thread does the whole run
        if device.cuda:
            staged = iter(await trio.to_thread.run_sync(device.stage, [t for t in inputs if t is not None]))
            inputs = [None if t is None else next(staged) for t in inputs]
        job = Job(msg["id"], graph, inputs, consts, fetch, keep, written, schedule, layout, inbound,
                  bool(msg.get("trace")) and schedule is not None, cancel=cancel)
        if job.trace:
            job.send_log = self._send_logs[job.id] = []
            job.received = (msg.started_ns, msg.received_ns)
        run = functools.partial(run_job, job, server=server, residents=self.residents,
                                send_part=self._queue_part)
        out = await self._compute(run, job, peak)
        fetched = out.fetched
        if device.cuda:
            fetched = await trio.to_thread.run_sync(device.to_host, fetched)
        server.stats["runs"] += 1
        fields = {"id": msg["id"], "handles": out.handles, "metas": out.metas}
        if out.early:
            fields["early"] = out.early
        if out.timeline is not None:
            fields["timeline"] = out.timeline
        return Message("result", fields, fetched)

    def _bind_inputs(self, msg: Message, n_plan: int, inbound: Inbound | None) -> list[torch.Tensor | None]:
        """The run's inputs by position: a streamed one is a hole, filled as its frame lands."""
        n_in, n_consts = msg["inputs"], len(msg["consts"])
        bufs = msg.buffers[n_plan:]
        if type(n_in) is not int or n_in < 0 or len(bufs) != n_in + n_consts:
            raise RemoteProtocolError(f"run message: {len(bufs)} buffers for {n_in} inputs and "
                                      f"{n_consts} constants")
        inputs: list[torch.Tensor | None] = list(_tensors(bufs[:n_in], n_in, "run"))
        if inbound is not None:
            total = n_in + len(inbound.positions)
            if any(p >= total for p in inbound.positions):
                raise RemoteProtocolError(f"run message: streamed input position out of range ({total} "
                                          "inputs)")
            given = iter(inputs)
            inputs = [None if p in inbound.positions else next(given) for p in range(total)]
        return inputs

    async def _compute(self, run: Callable[..., JobResult], job: Job, peak: int) -> JobResult:
        """``run`` holding a compute slot, with the job's predicted peak reserved under the memory
        limit (its constants pinned first, so making room cannot evict them): in a worker thread, or
        on the event loop when it is tiny (see ``_tiny``) and a slot is free at once."""
        server = self.server
        if not server.device.cuda and job.schedule is None and all(n.op in SOURCE_OPS
                                                                   for n in job.graph.nodes):
            return run(lender=None)  # nothing to compute (``.cpu()`` of a kept value): no thread needed
        with server.pool.pinned(job.consts), server.pool.run_reservation(peak):
            lender = Lender(server.compute_limiter)
            if _tiny(job, server.device.cuda) and lender.try_acquire():
                # a thread hop costs more than the run (~100 us each way under load); a tiny run
                # blocks the loop for less than that, and holds the slot like any other run
                try:
                    server.stats["runs_inline"] += 1
                    return run(lender=None)
                finally:
                    lender.release()
            await lender.acquire()
            try:
                # runs have their own thread limiter: one waiting for a streamed input holds its thread,
                # and a connection holds at most one (its work is sequential), so up to max_connections
                # stalled runs cannot starve other runs, nor the default limiter (decoding, digests)
                return await trio.to_thread.run_sync(functools.partial(run, lender=lender),
                                                     limiter=server.run_threads)
            finally:
                lender.release()

    async def _decode(self, msg: Message) -> _Decoded:
        """The run's graph, how many buffers described it, its stage schedule and layout, and its
        predicted peak (0 without a memory limit). A big graph or template fill is decoded in a worker
        thread, so the event loop keeps serving other connections meanwhile."""
        t0 = time.perf_counter()
        out = await trio.to_thread.run_sync(self._prepare, msg) if self._heavy(msg) else self._prepare(msg)
        self.server.stats["plan_seconds"] += time.perf_counter() - t0
        return out

    def _heavy(self, msg: Message) -> bool:
        bufs, plan = msg.buffers, msg.get("plan")
        if plan == "graph":
            return bool(bufs) and isinstance(bufs[0], memoryview) and len(bufs[0]) > HEAVY_BYTES
        slot = self.slots.get(msg.get("slot")) if type(msg.get("slot")) is int else None
        return slot is None or not slot.filled or ("fix" not in msg.fields and bool(bufs)
                                                   and len(bufs[0]) > HEAVY_FILLS)

    def _prepare(self, msg: Message) -> _Decoded:
        graph, n_plan = self._plan(msg)
        schedule, layout = self._schedule(msg, graph)
        pool = self.server.pool
        if pool.limit is None:
            return graph, n_plan, schedule, layout, 0
        check_sizes(graph)
        consts = {n.args[0]: pool.nbytes(n.args[0]) for n in graph.nodes if n.op == CONST}
        return graph, n_plan, schedule, layout, predict_peak(graph, consts).peak

    def _schedule(self, msg: Message, graph: Graph) -> tuple[StageSchedule | None, list[list[int]] | None]:
        """The run's stage schedule (sent whole and cached under its plan key, or named by key) and
        its checked layout on ``graph``."""
        stages = msg.get("stages")
        if stages is None:
            return None, None
        if isinstance(stages, str):
            schedule = self.server.plans.get(stages)
            if schedule is None:
                raise MissingPlanError(stages)
        else:
            schedule = StageSchedule.from_wire(stages)
        layout = schedule.check(graph)  # a cached schedule is checked too: another client may have sent it
        self.server.plans[schedule.key] = schedule
        return schedule, layout

    def _queue_part(self, req_id: int, pos: int, host: torch.Tensor) -> None:
        if not self.closing:
            self._in_flight += 1
            self._queue(Message("part", {"id": req_id, "output": pos}, [host]))

    def _plan(self, msg: Message) -> tuple[Graph, int]:
        """The graph a run names, and how many leading buffers described it."""
        plan = msg["plan"]
        if plan == "graph":
            if not msg.buffers or not isinstance(msg.buffers[0], memoryview):
                raise RemoteProtocolError("run message: plan 'graph' needs the graph bytes first")
            graph = _graph(msg.buffers[0], self.server.limits.max_nodes)
            if "slot" in msg.fields:
                self._register(msg, graph)
            return graph, 1
        if plan == "slot":
            return self._fill(msg)
        raise RemoteProtocolError(f"run message: unknown plan {plan!r:.40}")

    def _register(self, msg: Message, graph: Graph) -> None:
        slot, check = msg["slot"], msg.get("check")
        if type(slot) is not int or not 0 <= slot < self.server.limits.max_slots or type(check) is not str:
            raise RemoteProtocolError("run message: bad slot registration")
        parts = split(graph)
        if parts is None or parts.digest != check:
            # the client derived another template from this graph: it must stop using the slot
            self.slots.pop(slot, None)
            raise ProtocolError("template mismatch: the client and server disagree on the graph")
        template = self.server.templates.get(parts.digest)
        if template is None:
            template = self.server.templates[parts.digest] = Template(parts.skeleton)
        self.slots[slot] = Slot(template, parts.ints, parts.ints, parts.strs, graph, filled=False)

    def _fill(self, msg: Message) -> tuple[Graph, int]:
        """The graph of a slot run, and how many buffers carried its corrections: none when they
        came in the header (``fix``, a few ints), else two vectors."""
        slot = self.slots.get(msg["slot"]) if type(msg.get("slot")) is int else None
        if slot is None or msg.get("check") != slot.template.digest:
            raise RemoteProtocolError("run message: unknown plan slot, or its template differs")
        if "fix" in msg.fields:
            n_plan = 0
            idx_a, vals_a = fix_lists(msg["fix"], len(slot.last))
        else:
            n_plan = 2
            if len(msg.buffers) < 2:
                raise RemoteProtocolError("run message: plan 'slot' needs its corrections")
            idx, vals = msg.buffers[0], msg.buffers[1]
            if not (isinstance(idx, torch.Tensor) and idx.dtype == torch.int32 and idx.dim() == 1
                    and isinstance(vals, torch.Tensor) and vals.dtype == torch.int64
                    and vals.shape == idx.shape):
                raise RemoteProtocolError("run message: corrections must be int32 and int64 vectors")
            idx_a, vals_a = idx.numpy(), vals.numpy()
        ints = apply(predict(slot.last, slot.prev), idx_a, vals_a)
        strs = list(slot.strs)
        for pair in msg.get("strs", []):
            if not (isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int
                    and 0 <= pair[0] < len(strs) and isinstance(pair[1], str)):
                raise RemoteProtocolError("run message: bad string correction")
            strs[pair[0]] = pair[1]
        if np.array_equal(ints, slot.last) and strs == slot.strs:
            graph = slot.graph
        else:
            graph = slot.template.fill(ints, strs)
        slot.prev, slot.last, slot.strs, slot.graph, slot.filled = slot.last, ints, strs, graph, True
        self.server.stats["plan_cache_hits"] += 1
        return graph, n_plan


HANDLERS: dict[str, Callable[[Connection, Message], Awaitable[Message | None]]] = {
    "has": Connection.on_has,
    "upload": Connection.on_upload,
    "run": Connection.on_run,
    "fetch": Connection.on_fetch,
    "free": Connection.on_free,
    "stats": Connection.on_stats,
}


def _tiny(job: Job, cuda: bool) -> bool:
    """Whether ``job`` may run on the event loop: a CPU run with no stages, of at most TINY_NODES
    nodes whose values (inputs, constants and residents read included) add up to at most TINY_BYTES.
    Its cost is bounded by what it touches, so it stalls other connections by microseconds. (A
    matmul's work grows faster than its bytes: TINY_BYTES keeps even that well under a millisecond.)"""
    nodes = job.graph.nodes
    if cuda or job.schedule is not None or job.inbound is not None or len(nodes) > TINY_NODES:
        return False
    total = 0
    for n in nodes:
        for m in n.outputs:
            total += _numel(m.shape) * m.dtype.itemsize
    return total <= TINY_BYTES


def _nbytes(b: torch.Tensor | memoryview | bytes) -> int:
    return b.numel() * b.element_size() if isinstance(b, torch.Tensor) else memoryview(b).nbytes


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _graph(data: memoryview, max_nodes: int) -> Graph:
    """The graph in ``data``, refused past ``max_nodes`` before the expensive part: its JSON parse
    holds the GIL, so even in a worker thread it stalls the event loop for as long as it takes.
    Each node record is a JSON list of about 100-200 bytes, so the header's ``[`` bytes bound the
    node count from above and its length bounds the parse."""
    if len(data) >= 8:
        hlen = int.from_bytes(data[4:8], "little")
        brackets = bytes(data[8 : 8 + hlen]).count(b"[")
        if brackets > 16 * max_nodes or hlen > 256 * max_nodes:
            raise RemoteProtocolError(f"run message: a graph header of {hlen} bytes and {brackets} lists is "
                                      f"more than {max_nodes} nodes take (--max-nodes)")
    return graph_from_bytes(data, max_nodes=max_nodes)


def _strings(v: list, what: str) -> list[str]:
    if not all(isinstance(x, str) for x in v):
        raise RemoteProtocolError(f"{what} must be strings")
    return v


def _ints(v: list, what: str) -> list[int]:
    if not all(type(x) is int for x in v):
        raise RemoteProtocolError(f"{what} must be ints")
    return v


def _tensors(bufs: list, n: int, what: str) -> list[torch.Tensor]:
    if len(bufs) != n or not all(isinstance(b, torch.Tensor) for b in bufs):
        raise RemoteProtocolError(f"{what} message: expected {n} tensors")
    return bufs
