"""One client connection: a receive task, a work task and a send task, joined by channels.

Call tree::

    Connection(server, stream).serve()     stream: a trio socket, or a trio.SSLStream (TLS)
      handshake()                       (TLS handshake) hello -> token check -> welcome (or error + close)
      receive_loop()                    frames -> work queue, in order; ping answered at once;
                                        a run's streamed ``input`` frames go straight to its Inbound;
                                        ``cancel`` at once: the run's Cancel is set (see on_run)
      work_loop()                       admits one message at a time, in the order received:
        HANDLERS[kind](msg)               has, upload, stats: answered at once; run, fetch, free:
                                          a ticket (_order: which earlier requests it waits for),
                                          then a task each, at most --max-runs (then backpressure)
          run (admitted): frees; plan (graph | slot, its corrections in the header or two vectors)
               -> Graph (_decode); inline constants (digest checked); names and handles checked
          run (its task, _run): wait for its ticket; then, in a worker thread: stage inputs,
               compute, keep; a tiny run (``_tiny``: CPU, no stages, few nodes and bytes) runs on
               the event loop instead, holding a compute slot and its memory reservation like any other
          run with stages: StagedInterpreter; a streamed input is waited for (the compute slot
               lent meanwhile) when its first reader's stage starts; each fetched output final
               before the end goes to the send task as a ``part`` when its stage ends
          run cancelled: the worker stops at its next node (a staged run: node or stage) boundary,
               waits on the event loop end, its inputs and slot are let go; reply: error ``cancelled``
      send_loop()                       replies -> bytes -> socket (a small reply with nothing
                                        queued before it is written by the work task at once)
      finally: residents freed; a run still waiting for streamed inputs is failed

Runs of one connection (many sessions multiplexed on it) compute at once, as if they ran one at a
time in arrival order: a run waits only for earlier ones that keep a handle it reads or touch the
same resident values (_order), so a long prefill does not hold up other sessions' decode steps. The
device's compute slots (``--workers``) bound them across connections. Compute runs in worker
threads, so it never stops the event loop from serving other connections; only a run whose cost is
bounded by a few KiB touched runs on the loop, where a thread hop would cost more. A frame that
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
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import trio

from genie._errors import (
    AuthenticationError,
    GenieError,
    ProtocolError,
    RemoteMemoryError,
    RemoteProtocolError,
)
from genie.graph import CONST, RESIDENT, SOURCE_OPS, content_digest
from genie.server._decode import Decoder
from genie.server._inbound import Inbound
from genie.server._job import Cancel, Job, JobResult, Lender, run_job, written_sources
from genie.server._order import Order, Ticket
from genie.server._residency import Residents
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
SMALL_REPLY = 32 << 10  # payload bytes of a reply written at once by the work task (see _reply)
TINY_NODES = 32  # a run this small (in nodes and in bytes touched) runs on the event loop
TINY_BYTES = 64 << 10


class Connection:
    def __init__(self, server: Server, stream: trio.socket.SocketType | trio.SSLStream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        lim = server.limits
        self.proto = Protocol(SERVER, max_frame=lim.max_frame, max_header=lim.max_header,
                              max_buffers=lim.max_buffers, allocate=self._allocate)
        self.residents = Residents(server.pool)
        self.order = Order(self.residents)  # which earlier requests each request waits for
        self.runs_done = 0
        self.decoder = Decoder(server)  # this connection's plan slots; a run's plan -> graph
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
        self._opened = time.monotonic()
        self.ended = "connection lost"  # who ended it, for the --verbose close line

    # -- lifetime -------------------------------------------------------------------------------
    async def serve(self) -> None:
        self.log("accepted")
        try:
            with trio.move_on_after(self.server.hello_timeout):
                if not await self.handshake():
                    return
            if not self.greeted:
                self.log(f"refused: no hello within {self.server.hello_timeout:g} s")
                return
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._guard, self.send_loop)
                nursery.start_soon(self._guard, self.work_loop)
                nursery.start_soon(self._guard, self.receive_loop)
                nursery.start_soon(self._guard, self.idle_watch)
        except GONE as e:
            self.ended = f"connection lost ({e})"
        finally:
            self.residents.close()
            close_now(self.stream)
            if self.greeted:
                self.log(f"closed: {self.ended}, after {time.monotonic() - self._opened:.2f} s, "
                         f"{self.runs_done} runs")

    async def _guard(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one of the three tasks; its end (or an I/O error) ends the connection."""
        try:
            await loop()
        except (ProtocolError, RemoteMemoryError) as e:  # a broken or too big frame: say so, close
            self.fatal(e)
            return
        except GONE as e:
            self.ended = f"connection lost ({e})"
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
                self.ended = f"by the server (idle for {idle:g} s)"
                return

    def fatal(self, exc: BaseException, req_id: int = 0) -> None:
        """The peer broke the protocol: stop working, say why, close within a bounded time."""
        if self.closing:
            return
        self.closing = True
        self.ended = f"by the server ({type(exc).__name__}: {exc})"
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
                self.log(f"refused: TLS handshake failed: {e.__cause__ or e}")
                return False
        try:
            msg = await receive_message(self.stream, self.proto)
        except RemoteProtocolError as e:
            self.log(f"refused: bad greeting: {e}")
            return False
        if msg is None:
            self.log("refused: closed by the client before its hello")
            return False
        expected = self.server.token
        if msg["version"] != VERSION:
            reply = error_message(0, RemoteProtocolError(f"server speaks version {VERSION}, client "
                                                         f"{msg['version']}"))
        elif expected and not hmac.compare_digest(msg["token"].encode(), expected.encode()):
            reply = error_message(0, AuthenticationError("bad token"))
        else:
            reply = Message("welcome", {"version": VERSION, "device": str(self.server.device),
                                        "max_frame": self.server.max_frame, "clock": time.perf_counter_ns(),
                                        "pid": os.getpid()})
        await send_parts(self.stream, self.proto.send(reply))
        if reply.kind == "error":
            self.log(f"refused: {reply['message']}")
            return False
        self.log(f"hello ok (protocol {VERSION}{', token checked' if expected else ''})")
        self.server.stats["connections"] += 1
        self.greeted = True
        return True

    # -- the three tasks ------------------------------------------------------------------------
    async def receive_loop(self) -> None:
        try:
            while not self.closing:
                msg = await receive_message(self.stream, self.proto)
                if msg is None:
                    self.ended = "by the client"
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
        """Requests in arrival order. Each is checked and admitted here, one at a time (a run's plan
        decoded and its constants stored; its ticket taken, see _order); then a run, a fetch or a
        free that must wait goes on in a task of its own, at most --max-runs at once: past that,
        this loop stops taking frames and the client's sends back up (TCP backpressure)."""
        slots = trio.Semaphore(self.server.limits.max_runs)
        with self.work_scope:
            async with trio.open_nursery() as self._tasks:
                async for msg in self._work_recv:
                    await slots.acquire()
                    req_id = msg.get("id", 0)
                    self._working += 1
                    try:
                        out = await HANDLERS[msg.kind](self, msg)
                    except ProtocolError as e:  # malformed content: answer, then close this connection
                        slots.release()
                        self.fatal(e, req_id)
                        break
                    except Exception as e:
                        out = error_message(req_id, e)
                    finally:
                        self._working -= 1
                        self._active = trio.current_time()
                    if isinstance(out, Pending):
                        self._start(out, slots)
                        continue
                    slots.release()
                    if out is not None and not self.closing:
                        self._reply(out)
                await trio.sleep_forever()  # fatal(): the send task finishes the conversation

    def _start(self, pending: Pending, slots: trio.Semaphore | None) -> None:
        self._working += 1
        stats = self.server.stats  # the most tasks one connection has had at once (--max-runs)
        stats["peak_tasks_per_connection"] = max(stats["peak_tasks_per_connection"], self._working)
        self._tasks.start_soon(self._finish, pending, slots)

    async def _finish(self, pending: Pending, slots: trio.Semaphore | None) -> None:
        """Run an admitted request's task, reply, then end its ticket: after the reply is queued,
        so that a later run writing a value this one sends waits for the send (see ``_in_flight``)."""
        ticket, ok = pending.ticket, False
        try:
            try:
                reply = await pending.work()
                ok = True
            except ProtocolError as e:
                self.fatal(e, ticket.id)
                return
            except Exception as e:
                reply = error_message(ticket.id, e)
            if reply is not None and not self.closing:
                self._reply(reply)
        finally:
            self.order.finish(ticket, ok)
            self._working -= 1
            self._active = trio.current_time()
            if slots is not None:
                slots.release()

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

    async def on_free(self, msg: Message) -> Pending | None:
        return self._free(_ints(msg["handles"], "handles"))

    def _free(self, handles: list[int]) -> Pending | None:
        """Drop ``handles`` once the earlier requests that read or keep them have ended: at once when
        none is left, else in a task (the Pending)."""
        ticket = self.order.admit(0, set(), frees=handles)
        if not ticket.after:
            self.residents.free(handles)
            self.order.finish(ticket, True)
            return None

        async def work() -> None:
            await ticket.wait()
            self.residents.free(handles)

        return Pending(ticket, work)

    async def on_stats(self, msg: Message) -> Message:
        return Message("report", {"id": msg["id"], "stats": self.server.report()})

    async def on_fetch(self, msg: Message) -> Pending:
        handle = msg["handle"]
        keys, producers = self.order.reads([handle])
        ticket = self.order.admit(msg["id"], keys, producers)

        async def work() -> Message:
            await ticket.wait()  # the run keeping it, and earlier writers of its storage
            t = self.residents.get(handle)
            if t is None:
                raise GenieError(f"handle {handle} is not resident on this connection")
            device = self.server.device
            host = await trio.to_thread.run_sync(device.to_host, [t]) if device.cuda else [t]
            return Message("result", {"id": msg["id"], "handles": [], "metas": []}, host)

        return Pending(ticket, work)

    async def on_run(self, msg: Message) -> Pending:
        """Admit a run (its frees first, as the client sent them before it); its task computes."""
        req_id = msg["id"]
        inbound = self.inbound.get(req_id) if "stream" in msg.fields else None
        cancel = self.cancels.setdefault(req_id, Cancel())
        try:
            if "frees" in msg.fields:
                freeing = self._free(_ints(msg["frees"], "frees"))
                if freeing is not None:
                    self._start(freeing, None)  # one per run at most: bounded by --max-runs too
            job, peak, ticket, writes = await self._admit_run(msg, inbound, cancel)
        except BaseException as e:
            if isinstance(e, RunCancelledError):
                self.server.stats["cancelled"] += 1
            self._forget_names(msg)
            self._run_ended(req_id, cancel, inbound)
            raise
        return Pending(ticket, functools.partial(self._run, job, peak, ticket, writes))

    async def _admit_run(self, msg: Message, inbound: Inbound | None,
                         cancel: Cancel) -> tuple[Job, int, Ticket, bool]:
        """In arrival order: decode the plan (slot state follows the order), bind the inputs, store
        the inline constants (a later run may name them), check the handles and take a ticket."""
        graph, n_plan, schedule, layout, peak = await self.decoder.decode(msg)
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
        names = self.residents.check_names(msg.get("names"), len(keep), self.order.live)
        keys, producers = self.order.reads(n.args[0] for n in graph.nodes if n.op == RESIDENT)
        consts = [n.args[0] for n in graph.nodes if n.op == CONST]
        written, writes_residents = written_sources(graph)
        job = Job(msg["id"], graph, inputs, consts, fetch, keep, written, schedule, layout, inbound,
                  bool(msg.get("trace")) and schedule is not None, cancel=cancel, names=names)
        if job.trace:
            job.send_log = self._send_logs[job.id] = []
            job.received = (msg.started_ns, msg.received_ns)
        ticket = self.order.admit(job.id, keys, producers, names=names or ())
        if ticket.after:
            self.server.stats["runs_ordered"] += 1  # waits for an earlier run of this connection
        return job, peak, ticket, writes_residents

    def _forget_names(self, msg: Message) -> None:
        """A run failed before it was admitted: a later run reading a handle it named learns so."""
        names = msg.get("names")
        if type(names) is list and len(names) <= len(msg.get("keep") or ()):
            for h in names:
                if type(h) is int and not self.order.live(h):
                    self.order.forget(h, msg["id"])

    def _run_ended(self, req_id: int, cancel: Cancel, inbound: Inbound | None) -> None:
        if self.cancels.get(req_id) is cancel:
            del self.cancels[req_id]
        if inbound is not None:
            inbound.run_done = True
            self._settle(req_id)

    async def _run(self, job: Job, peak: int, ticket: Ticket, writes_residents: bool) -> Message:
        """A run's task: wait for the earlier runs it depends on, compute, build the reply."""
        assert job.cancel is not None
        t0 = time.perf_counter()
        try:
            with job.cancel.scope:  # the event loop's waits (earlier runs, the slot, sends) end on cancel
                return await self._execute(job, peak, ticket, writes_residents)
            raise RunCancelledError(f"run {job.id} was cancelled by the client")
        except RunCancelledError:
            self.server.stats["cancelled"] += 1
            self.server.stats["cancelled_seconds"] += time.perf_counter() - t0  # until it stopped
            raise
        finally:
            self._run_ended(job.id, job.cancel, job.inbound)

    async def _execute(self, job: Job, peak: int, ticket: Ticket, writes_residents: bool) -> Message:
        server = self.server
        await ticket.wait()
        assert job.cancel is not None
        job.cancel.check()
        if writes_residents:  # a resident being sent must not change under the send
            while self._in_flight:
                await self._sent.wait()
        device = server.device
        # on CUDA, staging and copying back run beside other connections' compute (copy stream);
        # on the CPU both are free, so one worker thread does the whole run
        if device.cuda:
            given = [t for t in job.inputs if t is not None]
            staged = iter(await trio.to_thread.run_sync(device.stage, given))
            job.inputs = [None if t is None else next(staged) for t in job.inputs]
        run = functools.partial(run_job, job, server=server, residents=self.residents,
                                send_part=self._queue_part)
        out = await self._compute(run, job, peak)
        fetched = out.fetched
        if device.cuda:
            fetched = await trio.to_thread.run_sync(device.to_host, fetched)
        server.stats["runs"] += 1
        self.runs_done += 1
        fields = {"id": job.id, "handles": out.handles, "metas": out.metas}
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
                # runs have their own thread limiter, sized so that stalled runs (waiting for a
                # streamed input, holding their thread) cannot starve the others (see Server)
                return await trio.to_thread.run_sync(functools.partial(run, lender=lender),
                                                     limiter=server.run_threads)
            finally:
                lender.release()

    def _queue_part(self, req_id: int, pos: int, host: torch.Tensor) -> None:
        if not self.closing:
            self._in_flight += 1
            self._queue(Message("part", {"id": req_id, "output": pos}, [host]))


@dataclass
class Pending:
    """An admitted request that goes on in a task of its own: its ticket, and the work left."""

    ticket: Ticket
    work: Callable[[], Awaitable[Message | None]]


# each answers at once (a reply, or None), or hands back the Pending rest of its work
HANDLERS: dict[str, Callable[[Connection, Message], Awaitable[Message | Pending | None]]] = {
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
