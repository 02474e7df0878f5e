"""The server's side of one client connection: a receive task, a work task and a send task, joined
by channels. What each request does is ``_requests``.

Call tree::

    ConnectionHandler(server, stream).serve()   stream: a trio socket, or a trio.SSLStream (TLS)
      handshake()                       (TLS handshake) hello -> token check -> welcome (or error + close)
      receive_loop()                    frames -> work queue, in order; ping answered at once;
                                        a run's streamed ``input`` frames go straight to its Inbound;
                                        ``cancel`` at once: the run's Cancel is set (see on_run)
      work_loop()                       admits one message at a time, in the order received:
        REQUESTS[kind](conn, msg)         (``_requests``) has, upload, stats: answered at once; run,
                                          fetch, free: a ticket (_order: which earlier requests it
                                          waits for), then a task each, at most --max-runs (then
                                          backpressure)
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
import hmac
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable
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
from genie.server._inbound import Inbound
from genie.server._job import Cancel
from genie.server._order import Order
from genie.server._reader import RunReader
from genie.server._requests import REQUESTS, Pending, expect_tensors
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

SMALL_REPLY = 32 << 10  # payload bytes of a reply written at once by the work task (see reply)


class ConnectionHandler:
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
        self.reader = RunReader(server)  # this connection's template slots; a run's graph field -> Graph
        self.outbox, self._outbox_recv = trio.open_memory_channel[Message | memoryview](math.inf)
        self._queued = 0  # outbox items not yet written: a reply may skip the queue only when 0
        self._raw = writable_now(stream)
        self.work, self._work_recv = trio.open_memory_channel[Message](64)
        self.work_scope = trio.CancelScope()
        self.in_flight = 0  # result messages queued or being written
        self.sent = trio.Event()  # set (and replaced) each time that count drops to zero
        self.inbound: dict[int, Inbound] = {}  # run id -> its streamed inputs
        self.cancels: dict[int, Cancel] = {}  # run id -> its Cancel, from its frame until it ends
        self.send_logs: dict[int, list] = {}  # traced run id -> [name, start, end] of its parts' sends
        self.greeted = False
        self.closing = False
        self.working = 0  # handlers in progress (the idle watch leaves a busy connection alone)
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
            if self.working or self.in_flight or self.inbound:
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
            self.queue(error_message(req_id, exc))
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
                    self.queue(Message("pong", {"id": msg["id"]}))
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
            self.queue(error_message(msg["id"], exc))

    def _expect_inputs(self, msg: Message) -> None:
        req_id = msg["id"]
        if req_id in self.inbound:
            raise RemoteProtocolError(f"run {req_id}: a run with this id is still receiving inputs")
        self.inbound[req_id] = Inbound(msg["stream"], self.server.limits.stream_timeout)

    async def _on_input(self, msg: Message) -> None:
        inbound = self.inbound.get(msg["id"])
        if inbound is None:
            raise RemoteProtocolError(f"input frame for run {msg['id']}, which streams no inputs")
        (t,) = expect_tensors(msg.buffers, 1, "input")
        if self.server.device.cuda:  # onto the device on the copy stream, beside running stages
            (t,) = await trio.to_thread.run_sync(self.server.device.stage, [t])
        inbound.arrive(msg["input"], t, msg.started_ns, msg.received_ns)
        self.settle(msg["id"])

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

    def settle(self, req_id: int) -> None:
        inbound = self.inbound.get(req_id)
        if inbound is not None and inbound.run_done and inbound.complete:
            del self.inbound[req_id]

    def _abort_inbound(self, exc: BaseException) -> None:
        for inbound in self.inbound.values():
            inbound.abort(exc)

    def queue(self, msg: Message | memoryview) -> None:
        self._queued += 1
        self.outbox.send_nowait(msg)

    def reply(self, msg: Message) -> None:
        """Send a reply: a small one at once from this task when nothing is queued before it (a
        pass of the loop saved; what the socket does not take goes first in the outbox), else
        through the send task. Sent at once, its bytes are copied out: no result stays in flight."""
        raw = self._raw
        if raw is None or self._queued or sum(_nbytes(b) for b in msg.buffers) > SMALL_REPLY:
            if msg.kind == "result" and msg.buffers:
                self.in_flight += 1  # fetched values may be residents: see on_run
            self.queue(msg)
            return
        if msg.kind in ("result", "error"):
            self.send_logs.pop(msg["id"], None)  # a traced result's timeline holds the list
        t0 = time.perf_counter_ns()
        rest = send_now(raw, self.proto.send(msg))
        self.server.stats["send_seconds"] += (time.perf_counter_ns() - t0) / 1e9
        if rest:
            self.queue(rest)

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
            self.send_logs.pop(msg["id"], None)  # a traced result's timeline holds the list
        t0 = time.perf_counter_ns()
        await send_parts(self.stream, self.proto.send(msg))
        t1 = time.perf_counter_ns()
        stats["send_seconds"] += (t1 - t0) / 1e9
        if msg.kind == "part" and msg["id"] in self.send_logs:
            self.send_logs[msg["id"]].append([f"send output {msg['output']}", t0, t1])
        if msg.kind in ("result", "part") and msg.buffers:
            self.in_flight -= 1
            if not self.in_flight:
                self.sent.set()
                self.sent = trio.Event()

    async def work_loop(self) -> None:
        """Requests in arrival order. Each is checked and admitted here, one at a time (a run's graph
        decoded and its constants stored; its ticket taken, see _order); then a run, a fetch or a
        free that must wait goes on in a task of its own, at most --max-runs at once: past that,
        this loop stops taking frames and the client's sends back up (TCP backpressure)."""
        slots = trio.Semaphore(self.server.limits.max_runs)
        with self.work_scope:
            async with trio.open_nursery() as self._tasks:
                async for msg in self._work_recv:
                    await slots.acquire()
                    req_id = msg.get("id", 0)
                    self.working += 1
                    try:
                        out = await REQUESTS[msg.kind](self, msg)
                    except ProtocolError as e:  # malformed content: answer, then close this connection
                        slots.release()
                        self.fatal(e, req_id)
                        break
                    except Exception as e:
                        out = error_message(req_id, e)
                    finally:
                        self.working -= 1
                        self._active = trio.current_time()
                    if isinstance(out, Pending):
                        self.start(out, slots)
                        continue
                    slots.release()
                    if out is not None and not self.closing:
                        self.reply(out)
                await trio.sleep_forever()  # fatal(): the send task finishes the conversation

    def start(self, pending: Pending, slots: trio.Semaphore | None) -> None:
        self.working += 1
        stats = self.server.stats  # the most tasks one connection has had at once (--max-runs)
        stats["peak_tasks_per_connection"] = max(stats["peak_tasks_per_connection"], self.working)
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
                self.reply(reply)
        finally:
            self.order.finish(ticket, ok)
            self.working -= 1
            self._active = trio.current_time()
            if slots is not None:
                slots.release()


def _nbytes(b: torch.Tensor | memoryview | bytes) -> int:
    return b.numel() * b.element_size() if isinstance(b, torch.Tensor) else memoryview(b).nbytes
