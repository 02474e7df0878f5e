"""The server's side of one client connection: a receive task, a work task and a send task, joined
by channels. What each request does is ``_requests``.

Call tree::

    ConnectionHandler(server, sock, peer).serve()   in the tenant's worker process (``_workers``);
                                        sock: the client's socket, handed over by the front process
                                        after it read the hello and checked the token (for TLS, one
                                        end of a local pair the front relays the decrypted bytes to)
      welcome()                         the welcome (device, max frame, clock, this worker's pid)
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
                                        queued before it is written by the work task at once);
                                        queued replies count against the memory limit until
                                        written, and past REPLY_QUEUE_BYTES/_ITEMS the receive and
                                        work tasks wait for them (replies_read): a client that
                                        does not read is not read
      finally: residents freed; a run still waiting for streamed inputs is failed

Runs of one connection (many sessions multiplexed on it) compute at once, as if they ran one at a
time in arrival order: a run waits only for earlier ones that keep a handle it reads or touch the
same resident values (_order), so a long prefill does not hold up other sessions' decode steps. The
device's compute slots (``--workers``) bound them across connections. Compute runs in worker
threads, so it never stops the event loop from serving other connections; only a run whose cost is
proven bounded by a few KiB touched (``_inline``) runs on the loop, where a thread hop would cost
more. A frame that
breaks the protocol closes this connection only; an error inside a run becomes an ``error`` reply.

Results are sent from the tensors themselves, without a copy. So a run that writes to a resident
value waits until no result is still being sent, and a run that writes to a constant (shared by
every client under its digest) writes to its own copy.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import torch
import trio

from genie._errors import (
    GenieError,
    LocalProtocolError,
    ProtocolError,
    RemoteMemoryError,
    RemoteProtocolError,
)
from genie.server._inbound import Inbound
from genie.server._job import Cancel
from genie.server._order import Order
from genie.server._reader import RunReader
from genie.server._requests import REQUESTS, Pending, expect_tensors, forget_names
from genie.server._residency import Residents, held_bytes
from genie.transport import (
    GONE,
    SERVER,
    VERSION,
    Message,
    Protocol,
    RunCancelledError,
    State,
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
REPLY_QUEUE_BYTES = 64 << 20  # replies a connection may leave unread before it is read no more
REPLY_QUEUE_ITEMS = 1024


class ConnectionHandler:
    def __init__(self, server: Server, stream: trio.socket.SocketType | trio.SSLStream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        lim = server.limits
        self.proto = Protocol(SERVER, max_frame=lim.max_frame, max_header=lim.max_header,
                              max_buffers=lim.max_buffers, allocate=self._allocate, state=State.GREETED)
        self.residents = Residents(server.pool)
        self.order = Order(self.residents)  # which earlier requests each request waits for
        self.runs_done = 0
        self.reader = RunReader(server)  # this connection's template slots; a run's graph field -> Graph
        # replies to send, each with the bytes it holds (counted in the pool's reply_bytes until
        # written); past REPLY_QUEUE_BYTES or _ITEMS the connection's requests wait (replies_read)
        self.outbox, self._outbox_recv = trio.open_memory_channel[tuple[Message | memoryview, int]](math.inf)
        self._queued = 0  # outbox items not yet written: a reply may skip the queue only when 0
        self._queued_bytes = 0
        self._drained = trio.Event()  # set when the outbox is back under its bounds
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
        try:
            await self.welcome()
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
        """Memory for a frame's payload of ``n`` bytes, once its header is in, counted under the
        memory limit until nothing holds it (``ConstantPool.hold_frame``): refused, before a byte of
        it is buffered, when it does not fit, so that frames read ahead of the work loop (past
        --max-runs) cannot make the server hold more than the limit."""
        return self.server.pool.hold_frame(n, self.server.device.allocate)

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

    async def welcome(self) -> None:
        """The front process read this connection's hello and checked its token before handing the
        connection here; the welcome comes from here, where the device is."""
        reply = Message("welcome", {"version": VERSION, "device": str(self.server.device),
                                    "max_frame": self.server.max_frame, "clock": time.perf_counter_ns(),
                                    "pid": os.getpid()})
        await send_parts(self.stream, self.proto.send(reply))
        self.greeted = True
        self.server.stats["connections"] += 1
        self.log(f"adopted by tenant {self.server.tenant!r}'s worker (pid {os.getpid()})")

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
                del msg  # its payload stays counted for as long as anything holds it
                await self.replies_read()  # a client that does not read its replies is not read
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
        if msg.kind == "run":  # a later run reading a handle it named learns why it is not there
            forget_names(self, msg)
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
        """Put ``msg`` in the outbox; the bytes it holds count against the memory limit until it is
        written. After the send task has ended (the connection is going), it is dropped."""
        n = held_bytes([msg]) if isinstance(msg, memoryview) else held_bytes(msg.buffers)
        try:
            self.outbox.send_nowait((msg, n))
        except (trio.BrokenResourceError, trio.ClosedResourceError):  # closed by fatal(), or ended
            self._sent(msg, 0)  # nobody will write it: only what it was counted for is undone
            return
        self._queued += 1
        if n:
            self._queued_bytes += n
            self.server.pool.hold_replies(n)

    def _sent(self, msg: Message | memoryview, n: int) -> None:
        """``msg`` left the outbox (written, or dropped with the connection): uncount it."""
        if n:
            self._queued_bytes -= n
            self.server.pool.drop_replies(n)
        if not isinstance(msg, memoryview) and msg.kind in ("result", "part") and msg.buffers:
            self.in_flight -= 1
            if not self.in_flight:
                self.sent.set()
                self.sent = trio.Event()
        if not self._backed_up():
            self._drained.set()

    def _backed_up(self) -> bool:
        return self._queued_bytes > REPLY_QUEUE_BYTES or self._queued > REPLY_QUEUE_ITEMS

    async def replies_read(self) -> None:
        """Until the outbox is back under its bounds (REPLY_QUEUE_BYTES, REPLY_QUEUE_ITEMS): a
        client that does not read its replies gets no more requests read or admitted, rather than
        an outbox that grows."""
        while self._backed_up():
            self.server.stats["reply_backpressure"] += 1
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()

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
        rest = send_now(raw, self._encode(msg))
        self.server.stats["send_seconds"] += (time.perf_counter_ns() - t0) / 1e9
        if rest:
            self.queue(rest)

    async def send_loop(self) -> None:
        try:
            async for msg, n in self._outbox_recv:
                try:
                    await self._send(msg)
                finally:
                    self._queued -= 1
                    self._sent(msg, n)
                del msg  # written: its values go as soon as nothing else holds them
            # the outbox is closed only by fatal(): all is said, so returning ends the connection
        finally:  # nothing more is written: what is left is dropped, and uncounted
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                while True:
                    msg, n = self._outbox_recv.receive_nowait()
                    self._queued -= 1
                    self._sent(msg, n)
            self._outbox_recv.close()  # later replies are dropped as they are queued

    def _encode(self, msg: Message) -> list:
        """``msg``'s frame, or, when it cannot be encoded (a result of a dtype with no wire form), an
        error reply for its request in its place: the connection carries on. Nothing once the client
        has closed its side: nobody is left to tell, and that is no error of ours."""
        if self.proto.state is State.CLOSED:
            self.server.stats["replies_dropped"] += 1
            return []
        try:
            return self.proto.send(msg)
        except LocalProtocolError as e:
            return self.proto.send(error_message(msg.get("id", 0), e))

    async def _send(self, msg: Message | memoryview) -> None:
        stats = self.server.stats
        if isinstance(msg, memoryview):  # the rest of a reply ``_reply`` began
            await send_parts(self.stream, [msg])
            return
        if msg.kind in ("result", "error"):
            self.send_logs.pop(msg["id"], None)  # a traced result's timeline holds the list
        t0 = time.perf_counter_ns()
        await send_parts(self.stream, self._encode(msg))
        t1 = time.perf_counter_ns()
        stats["send_seconds"] += (t1 - t0) / 1e9
        if msg.kind == "part" and msg["id"] in self.send_logs:
            self.send_logs[msg["id"]].append([f"send output {msg['output']}", t0, t1])

    async def work_loop(self) -> None:
        """Requests in arrival order. Each is checked and admitted here, one at a time (a run's graph
        decoded and its constants stored; its ticket taken, see _order); then a run, a fetch or a
        free that must wait goes on in a task of its own, at most --max-runs at once: past that,
        this loop stops taking frames and the client's sends back up (TCP backpressure)."""
        slots = trio.Semaphore(self.server.limits.max_runs)
        with self.work_scope:
            async with trio.open_nursery() as self._tasks:
                async for msg in self._work_recv:
                    await self.replies_read()  # nothing new while the client leaves replies unread
                    await slots.acquire()
                    if not await self._admit(msg, slots):
                        break
                    del msg  # a frame's payload is counted until nothing holds it
                await trio.sleep_forever()  # fatal(): the send task finishes the conversation

    async def _admit(self, msg: Message, slots: trio.Semaphore) -> bool:
        """Check and admit one request, holding one of ``slots``; False when it broke the protocol."""
        req_id = msg.get("id", 0)
        self.working += 1
        try:
            out = await REQUESTS[msg.kind](self, msg)
        except ProtocolError as e:  # malformed content: answer, then close this connection
            slots.release()
            self.fatal(e, req_id)
            return False
        except Exception as e:
            out = error_message(req_id, e)
            traceback.clear_frames(e.__traceback__)  # what the request held goes now (see _finish)
        finally:
            self.working -= 1
            self._active = trio.current_time()
        if isinstance(out, Pending):
            self.start(out, slots)
            return True
        slots.release()
        if out is not None and not self.closing:
            self.reply(out)
        return True

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
                # the run's frames hold its inputs: let them go now, not when a GC pass finds the
                # traceback's cycles (their received frames count against the memory limit)
                traceback.clear_frames(e.__traceback__)
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
