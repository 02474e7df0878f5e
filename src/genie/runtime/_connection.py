"""A client connection to ``genie serve``: many requests in flight over one socket, by id.

The only place on the client that sees a socket. Call tree::

    await Connection.open(host, port, token, stats)   connect; hello -> welcome (or refusal)
    await nursery.start(conn.run)                     then, as tasks of the owner's loop:
      read_loop()      frames -> the waiter of their id (recv_into for bulk payloads); a ``part``
                     (an output sent as its stage ended) is kept on the waiter until the result
      write_loop()     posted messages -> socket, in post order
      free_loop()      frees not carried by a run go out on their own after FREE_DELAY
      watchdog()       ping a quiet server; after DEAD_AFTER of silence it is lost
    conn.post(msg) -> Waiter      enqueue, without a checkpoint: post order is wire order
    await conn.wait(waiter)       the reply; a remote error is raised here as its Genie exception

When the link breaks, every waiter gets ConnectionLostError at once and the connection is closed for
good; the owner opens a new one. A request whose caller was cancelled still gets its reply: the
waiter's ``orphan`` callback then releases what the reply holds (the handles of a run).
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import time
from collections.abc import Callable

import torch
import trio

from genie._errors import (
    AuthenticationError,
    ConnectionLostError,
    GenieError,
    LocalProtocolError,
    RemoteExecutionError,
    RemoteMemoryError,
    RemoteProtocolError,
    UnsupportedOpError,
)
from genie._profile import active as profiling
from genie._profile import record
from genie.runtime._backend import Stats
from genie.transport import CLIENT, CLOSED, NEED_DATA, VERSION, BufferPool, Message, Protocol

RECV_SIZE = 256 << 10
COALESCE = 64 << 10
SEND_CHUNK = 8 << 20  # progress granularity of big buffers
FREE_DELAY = 0.05
PING_AFTER = float(os.environ.get("GENIE_PING_AFTER", "5"))
DEAD_AFTER = float(os.environ.get("GENIE_DEAD_AFTER", "30"))
BUFFERS = BufferPool()  # reply payloads, reused once their tensors are gone (one pool per process)
_GONE = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
_UPLOADS: dict[str, Callable[[Message], str]] = {  # span names of what a profile sees go out
    "input": lambda m: f"upload input {m['input']}",
    "run": lambda m: f"send run {m['id']}",
    "upload": lambda m: f"upload {len(m['digests'])} constants",
}


class MissingOnServerError(GenieError):
    """The server lacks constants a run named (evicted since): the client uploads and retries."""

    def __init__(self, digests: list[str], plan: str | None = None) -> None:
        self.digests = digests
        self.plan = plan  # a stage schedule's plan key the server no longer holds
        also = " and a stage schedule" if plan else ""
        super().__init__(f"server lacks {len(digests)} constant(s){also}")


def remote_error(msg: Message) -> Exception:
    """The Genie exception for an ``error`` reply."""
    kind, text, op = msg["kind"], msg["message"], msg.get("op", "")
    if kind == "execution":
        return RemoteExecutionError(text, op=op, remote_traceback=msg.get("traceback", ""))
    if kind == "unsupported":
        return UnsupportedOpError(op or "?", text)
    if kind == "memory":
        return RemoteMemoryError(text)
    if kind == "missing":
        plan = msg.get("plan")
        return MissingOnServerError([d for d in msg.get("missing", []) if isinstance(d, str)],
                                    plan if isinstance(plan, str) else None)
    if kind == "auth":
        return AuthenticationError(f"the genie server refused the connection: {text}")
    return RemoteProtocolError(f"the genie server reports a protocol error: {text}")


class Waiter:
    __slots__ = ("event", "reply", "error", "orphan", "abandoned", "parts")

    def __init__(self, orphan: Callable[[Message], None] | None) -> None:
        self.event = trio.Event()
        self.reply: Message | None = None
        self.error: BaseException | None = None
        self.orphan = orphan
        self.abandoned = False
        self.parts: dict[int, Message] = {}  # fetch position -> its ``part``, before the result


class Connection:
    def __init__(self, sock: trio.socket.SocketType, proto: Protocol, welcome: Message, stats: Stats,
                 address: str, clock_offset: int = 0) -> None:
        self.sock = sock
        self.clock_offset = clock_offset  # server perf_counter_ns minus ours (estimated at hello)
        self.proto = proto
        self.device = welcome["device"]
        self.max_frame = welcome["max_frame"]
        self.address = address
        self.stats = stats
        self.closed = False
        self.error: BaseException | None = None
        self._ids = itertools.count(1)
        self._waiters: dict[int, Waiter] = {}
        self._outbox, self._outbox_recv = trio.open_memory_channel[tuple](math.inf)
        self._frees: list[int] = []
        self._frees_posted = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._last_io = trio.current_time()

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    async def open(cls, host: str, port: int, token: str, stats: Stats) -> Connection:
        address = f"{host}:{port}"
        sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET,
                                  trio.socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            await sock.connect((host, port))
            proto = Protocol(CLIENT, allocate=BUFFERS.allocate)
            asked = time.perf_counter_ns()
            await _send(sock, proto.send(Message("hello", {"version": VERSION, "token": token or ""})))
            reply = await _receive(sock, proto, None)
            answered = time.perf_counter_ns()
        except _GONE as e:
            sock.close()
            raise ConnectionLostError(f"cannot reach the genie server at {address}: {e}") from e
        except BaseException:
            sock.close()
            raise
        if reply is None or reply.kind == "error":
            sock.close()
            if reply is None:
                raise ConnectionLostError(f"the genie server at {address} closed the connection")
            raise remote_error(reply)
        stats.bytes_sent += proto.bytes_sent
        stats.bytes_received += proto.bytes_received
        stats.round_trips += 1
        clock = reply.get("clock")  # the server's clock at welcome: roughly mid-way through the hello
        offset = clock - (asked + answered) // 2 if type(clock) is int else 0
        return cls(sock, proto, reply, stats, address, offset)

    # -- running --------------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._guard, self.read_loop)
                nursery.start_soon(self._guard, self.write_loop)
                nursery.start_soon(self._guard, self.free_loop)
                nursery.start_soon(self._guard, self.watchdog)
                task_status.started()
        finally:
            self._lose(ConnectionLostError(f"the connection to the genie server at {self.address} "
                                           "was closed"))

    async def _guard(self, loop: Callable) -> None:
        try:
            await loop()
        except _GONE as e:
            self._lose(ConnectionLostError(f"lost the genie server at {self.address}: {e}"))
        except (RemoteProtocolError, ConnectionLostError) as e:
            self._lose(e)
        except Exception as e:  # a bug here must not take the whole background loop down
            lost = ConnectionLostError(f"genie's connection to {self.address} failed: {e!r}")
            lost.__cause__ = e
            self._lose(lost)

    def _lose(self, exc: BaseException) -> None:
        """Fail everything in flight with ``exc`` and close; later calls must open a new one."""
        if not self.closed:
            self.closed, self.error = True, exc
            self.sock.close()
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
        waiters, self._waiters = self._waiters, {}
        for w in waiters.values():
            w.error = exc
            w.event.set()

    def close(self) -> None:
        self._lose(ConnectionLostError("the connection to the genie server was closed by this process"))

    # -- requests -------------------------------------------------------------------------------
    def post(self, msg: Message, *, reply: bool = True, orphan: Callable[[Message], None] | None = None,
             on_sent: Callable[[int], None] | None = None) -> Waiter | None:
        """Queue ``msg`` (an ``id`` is given to requests); returns the Waiter of its reply."""
        if self.closed:
            raise self.error or ConnectionLostError("not connected")
        size = sum(b.numel() * b.element_size() if isinstance(b, torch.Tensor) else len(b)
                   for b in msg.buffers)
        if size > self.max_frame:
            raise LocalProtocolError(f"a {msg.kind} message of {size} bytes is more than the server "
                                     f"accepts ({self.max_frame}): start it with a larger --max-frame")
        waiter = None
        if reply:
            req_id = next(self._ids)
            msg.fields["id"] = req_id
            waiter = self._waiters[req_id] = Waiter(orphan)
        if msg.kind == "run" and self._frees:
            msg.fields["frees"], self._frees = self._frees, []
        self._outbox.send_nowait((msg, waiter, on_sent))
        return waiter

    async def wait(self, waiter: Waiter) -> Message:
        try:
            await waiter.event.wait()
        except trio.Cancelled:
            reply = waiter.reply
            if reply is not None and reply.kind == "result" and waiter.orphan is not None:
                waiter.orphan(reply)
            waiter.abandoned = True
            raise
        if waiter.error is not None:
            raise waiter.error
        reply = waiter.reply
        assert reply is not None
        self.stats.round_trips += 1
        if reply.kind == "error":
            raise remote_error(reply)
        return reply

    async def request(self, msg: Message) -> Message:
        waiter = self.post(msg)
        assert waiter is not None
        return await self.wait(waiter)

    def free_later(self, handles: list[int]) -> None:
        """Batch frees: they ride on the next run, or go alone after FREE_DELAY."""
        if self.closed:
            return
        self._frees.extend(handles)
        self._frees_posted.set()

    # -- tasks ----------------------------------------------------------------------------------
    async def read_loop(self) -> None:
        while True:
            msg = await _receive(self.sock, self.proto, self._touch)
            if msg is None:
                raise ConnectionLostError(f"the genie server at {self.address} closed the connection")
            self.stats.bytes_received += msg.nbytes
            req_id = msg.get("id", 0)
            if profiling() and msg.kind in ("result", "part") and msg.buffers:
                what = f"output {msg['output']}" if msg.kind == "part" else f"result {req_id}"
                record(f"download {what}", "download", msg.started_ns, msg.received_ns)
            if msg.kind == "part":  # an early output: the run's result comes later
                w = self._waiters.get(req_id)
                if len(msg.buffers) != 1 or not isinstance(msg.buffers[0], torch.Tensor):
                    raise RemoteProtocolError("a part message must carry one tensor")
                if w is not None and not w.abandoned:
                    w.parts[msg["output"]] = msg
                continue
            if msg.kind == "error" and req_id == 0:
                raise remote_error(msg) if msg["kind"] == "protocol" else \
                    ConnectionLostError(f"the genie server closed the connection: {msg['message']}")
            w = self._waiters.pop(req_id, None)
            if w is None:
                continue  # a pong, or the reply of a request nobody waits for
            if w.abandoned:
                if w.orphan is not None and msg.kind == "result":
                    w.orphan(msg)
                continue
            w.reply = msg
            w.event.set()

    async def write_loop(self) -> None:
        async for msg, waiter, on_sent in self._outbox_recv:
            try:
                parts = self.proto.send(msg)
            except LocalProtocolError as e:  # nothing was written: only this request fails
                if waiter is not None:
                    self._waiters.pop(msg.fields["id"], None)
                    waiter.error = e
                    waiter.event.set()
                continue
            # sending counts as life (a slow link's long upload), but not our own pings
            t0 = time.perf_counter_ns()
            await _send(self.sock, parts, None if msg.kind == "ping" else self._touch, on_sent)
            self.stats.bytes_sent += msg.nbytes
            if msg.buffers and msg.kind in _UPLOADS and profiling():
                record(_UPLOADS[msg.kind](msg), "upload", t0, time.perf_counter_ns())

    async def free_loop(self) -> None:
        while True:
            await self._frees_posted.wait()
            await trio.sleep(FREE_DELAY)
            self._frees_posted = trio.Event()
            if self._frees:
                handles, self._frees = self._frees, []
                self.post(Message("free", {"handles": handles}), reply=False)

    async def watchdog(self) -> None:
        while True:
            await trio.sleep(min(PING_AFTER, DEAD_AFTER) / 2)
            if not self._waiters:
                continue
            quiet = trio.current_time() - self._last_io
            if quiet > DEAD_AFTER:
                raise ConnectionLostError(f"the genie server at {self.address} has not answered for "
                                          f"{quiet:.0f} s")
            if quiet > PING_AFTER:
                self.post(Message("ping", {"id": next(self._ids)}), reply=False)

    def _touch(self) -> None:
        self._last_io = trio.current_time()


async def _send(sock: trio.socket.SocketType, parts: list, touch: Callable[[], None] | None = None,
                on_sent: Callable[[int], None] | None = None) -> None:
    """Write one frame's parts: small ones joined into one send, big buffers in place."""
    small: list = []
    for p in parts:
        if len(p) < COALESCE:
            small.append(p)
            continue
        if small:
            await _send_all(sock, memoryview(b"".join(small)), touch, on_sent)
            small = []
        await _send_all(sock, memoryview(p).cast("B"), touch, on_sent)
    if small:
        await _send_all(sock, memoryview(b"".join(small)), touch, on_sent)


async def _send_all(sock: trio.socket.SocketType, mv: memoryview, touch, on_sent) -> None:
    while mv:
        n = await sock.send(mv[:SEND_CHUNK] if on_sent is not None else mv)
        mv = mv[n:]
        if touch is not None:
            touch()
        if on_sent is not None:
            on_sent(n)


async def _receive(sock: trio.socket.SocketType, proto: Protocol,
                   touch: Callable[[], None] | None) -> Message | None:
    """The next message, or None when the server closed cleanly between frames."""
    started = 0
    while True:
        ev = proto.next_event()
        if ev is CLOSED:
            return None
        if ev is not NEED_DATA:
            ev.received_ns = time.perf_counter_ns()  # type: ignore[union-attr]
            ev.started_ns = started or ev.received_ns  # type: ignore[union-attr]
            return ev  # type: ignore[return-value]
        buf = proto.receive_buffer()
        if buf is not None:
            proto.received_into(await sock.recv_into(buf))
        else:
            proto.receive_data(await sock.recv(RECV_SIZE))
        started = started or time.perf_counter_ns()
        if touch is not None:
            touch()
