"""A client connection to ``genie serve``: many requests in flight over one socket, by id.

The only place on the client that sees a socket. Call tree::

    await Connection.open(host, port, token, stats, tls)   no token in cleartext to another machine
                                                      (check_cleartext); connect (+ TLS handshake);
                                                      hello -> welcome (or refusal)
    await nursery.start(conn.run)                     then, as tasks of the owner's loop:
      read_loop()      frames -> the waiter of their id (recv_into for bulk payloads); a ``part``
                     (an output sent as its stage ended) is kept on the waiter until the result
      write_loop()     posted messages -> socket, in post order
      free_loop()      frees not carried by a run go out on their own after FREE_DELAY
      watchdog()       ping a quiet server; after DEAD_AFTER of silence it is lost; while
                       ``holds_values()`` says values are kept there, ping every KEEPALIVE
                       seconds so the server's idle timeout never frees them
    conn.post(msg) -> Waiter      enqueue, without a checkpoint: post order is wire order (a small
                                  frame with nothing queued is written at once, see _send_now)
    await conn.wait(waiter)       the reply; a remote error is raised here as its Genie exception;
                                  a caller cancelled while waiting for a run posts ``cancel``
    waiter.notify / conn.outcome / conn.abandon   the same without a task: the reader calls notify as
                                  the reply lands (the sync bridge wakes a blocked thread from it)
    direct_ready / hand_over      a blocked caller's own thread may write a run and read its reply
                                  while the owner's loop is paused (``Bridge.paused``, with
                                  ``runtime._direct``): no hop through the loop

When the link breaks, every waiter gets ConnectionLostError at once and the connection is closed for
good; the owner opens a new one. A request whose caller was cancelled still gets its reply (a run:
``cancel`` tells the server to stop it, and the reply is an error then, or its result if it had
finished): the waiter's ``orphan`` callback releases what a result holds (the handles of a run).

Bytes move through ``genie.transport``'s I/O helper, over a plain socket (payloads land by
``recv_into``) or a ``trio.SSLStream`` when ``tls`` is given (see ``tls_context``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import math
import os
import socket
import ssl
import time
from collections.abc import Callable

import torch
import trio

from genie._errors import CleartextTokenError, ConnectionLostError, LocalProtocolError, RemoteProtocolError
from genie._profile import active as profiling
from genie._profile import record
from genie.runtime._backend import Stats
from genie.transport import (
    CLIENT,
    GONE,
    VERSION,
    BufferPool,
    Message,
    Protocol,
    close_now,
    error_from_message,
    receive_message,
    send_now,
    send_parts,
    writable_now,
)

TLS = bool | str | os.PathLike | ssl.SSLContext | None  # what ``tls=`` may be
FREE_DELAY = 0.05
SMALL_FRAME = 32 << 10  # payload bytes of a frame written at once by its poster (see _send_now)
PING_AFTER = float(os.environ.get("GENIE_PING_AFTER", "5"))
DEAD_AFTER = float(os.environ.get("GENIE_DEAD_AFTER", "30"))
KEEPALIVE = float(os.environ.get("GENIE_KEEPALIVE", "60"))  # well under the server's --idle-timeout
BUFFERS = BufferPool()  # reply payloads, reused once their tensors are gone (one pool per process)
_UPLOADS: dict[str, Callable[[Message], str]] = {  # span names of what a profile sees go out
    "input": lambda m: f"upload input {m['input']}",
    "run": lambda m: f"send run {m['id']}",
    "upload": lambda m: f"upload {len(m['digests'])} constants",
}


def tls_context(tls: TLS) -> ssl.SSLContext | None:
    """The client's TLS context for ``tls=``: None or False: plain TCP; True: verify the server
    against the system's CAs; a path: against that CA bundle (PEM); an SSLContext: used as it is.
    The server's certificate must name the host connected to."""
    if tls is None or tls is False:
        return None
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls is True:
        return ssl.create_default_context()
    if isinstance(tls, (str, os.PathLike)):
        try:
            return ssl.create_default_context(cafile=os.fspath(tls))
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"tls=: cannot load the CA bundle {os.fspath(tls)!r}: {e}") from e
    raise TypeError(f"tls= must be True, a CA bundle path or an ssl.SSLContext, not {type(tls).__name__}")


def tls_from_env(value: str | None) -> TLS:
    """``GENIE_TLS``: unset, empty or 0/false/no: plain; 1/true/yes: system CAs; else a CA bundle path."""
    v = (value or "").strip()
    if v.lower() in ("", "0", "false", "no"):
        return None
    return True if v.lower() in ("1", "true", "yes") else v


def insecure_from_env(value: str | None) -> bool:
    """``GENIE_INSECURE``: 1/true/yes: a token may go in cleartext to another machine (a trusted
    network); anything else: it may not."""
    return (value or "").strip().lower() in ("1", "true", "yes")


def _loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


async def check_cleartext(host: str, port: int, token: str, tls: ssl.SSLContext | None,
                          insecure: bool) -> None:
    """CleartextTokenError unless sending ``token`` to ``host`` is safe: it is empty, the connection
    is TLS, ``insecure`` says the network is trusted, or every address ``host`` names is loopback
    (the token then never leaves this machine)."""
    if not token or tls is not None or insecure or host == "localhost":
        return
    if not _loopback(host):
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
        except OSError:
            infos = []
        if not infos or not all(_loopback(info[4][0]) for info in infos):
            raise CleartextTokenError(
                f"refusing to send the genie token in cleartext to {host}:{port}, which is not a "
                "loopback address: anyone on the network path could read it and use the server. "
                "Connect with tls=True or a CA bundle path (GENIE_TLS=1 or GENIE_TLS=ca.pem) to a "
                "server started with --tls-cert/--tls-key, or pass insecure=True (GENIE_INSECURE=1) "
                "if this network is trusted")


class Waiter:
    __slots__ = ("event", "reply", "error", "orphan", "abandoned", "parts", "cancel_id", "notify")

    def __init__(self, orphan: Callable[[Message], None] | None) -> None:
        self.event = trio.Event()
        self.reply: Message | None = None
        self.error: BaseException | None = None
        self.orphan = orphan
        self.abandoned = False
        self.cancel_id = 0  # a run's id: cancelled on the server if its caller stops waiting
        self.parts: dict[int, Message] = {}  # fetch position -> its ``part``, before the result
        # called (in this loop, once) as the reply or error lands: a blocked thread is woken from
        # here directly, with no task of this loop in between
        self.notify: Callable[[], None] | None = None

    def done(self) -> None:
        self.event.set()
        if self.notify is not None:
            notify, self.notify = self.notify, None
            notify()


class Connection:
    def __init__(self, stream: trio.socket.SocketType | trio.SSLStream, proto: Protocol, welcome: Message,
                 stats: Stats, address: str, clock_offset: int = 0) -> None:
        self.stream = stream
        self.clock_offset = clock_offset  # server perf_counter_ns minus ours (estimated at hello)
        self.proto = proto
        self.device = welcome["device"]
        self.max_frame = welcome["max_frame"]
        self.server_pid: int | None = welcome.get("pid")  # for genie.profile()'s Chrome trace
        self.address = address
        self.stats = stats
        self.closed = False
        self.error: BaseException | None = None
        self._ids = itertools.count(1)
        self._waiters: dict[int, Waiter] = {}
        self._outbox, self._outbox_recv = trio.open_memory_channel[tuple](math.inf)
        self._queued = 0  # outbox items not yet written: a frame may skip the queue only when 0
        self._raw = writable_now(stream)
        self._frees: list[int] = []
        self._frees_posted = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._last_io = trio.current_time()
        self.holds_values: Callable[[], bool] = lambda: False  # set by the owner
        # the direct path (a caller's own thread, the loop paused): the loop's clock, to keep
        # ``_last_io`` on it, and its token, to hand a loss over
        self._clock = trio.current_time() - time.perf_counter()
        self._token = trio.lowlevel.current_trio_token()
        self.poll: object | None = None  # the direct path's select.poll of the socket
        self._gone = False  # the direct path found the link broken; the loop closes it as it runs

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    async def open(cls, host: str, port: int, token: str, stats: Stats,
                   tls: ssl.SSLContext | None = None, *, insecure: bool = False) -> Connection:
        """Connect and greet; CleartextTokenError first if the token would go in cleartext to
        another machine (see ``check_cleartext``)."""
        address = f"{host}:{port}"
        await check_cleartext(host, port, token, tls, insecure)
        sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET,
                                  trio.socket.SOCK_STREAM)
        stream: trio.socket.SocketType | trio.SSLStream = sock
        mismatch = ("the server may speak TLS: connect with tls=" if tls is None else
                    "the server may not serve TLS (genie serve --tls-cert/--tls-key)")
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            await sock.connect((host, port))
            if tls is not None:
                # a peer that vanishes without close_notify has simply gone: the framing already
                # refuses a frame cut short
                stream = trio.SSLStream(trio.SocketStream(sock), tls, server_hostname=host,
                                        https_compatible=True)
                await _tls_handshake(stream, address, mismatch)
            proto = Protocol(CLIENT, allocate=BUFFERS.allocate)
            asked = time.perf_counter_ns()
            await send_parts(stream, proto.send(Message("hello", {"version": VERSION, "token": token or ""})))
            reply = await receive_message(stream, proto)
            answered = time.perf_counter_ns()
        except GONE as e:
            sock.close()
            raise ConnectionLostError(f"cannot reach the genie server at {address}: {e}") from e
        except RemoteProtocolError as e:
            sock.close()
            raise RemoteProtocolError(f"the peer at {address} does not answer as a genie server ({e}); "
                                      f"{mismatch}") from e
        except BaseException:
            sock.close()
            raise
        if reply is None or reply.kind == "error":
            sock.close()
            if reply is None:
                raise ConnectionLostError(f"the genie server at {address} closed the connection during "
                                          f"the greeting; {mismatch}")
            raise error_from_message(reply)
        stats.bytes_sent += proto.bytes_sent
        stats.bytes_received += proto.bytes_received
        stats.round_trips += 1
        clock = reply.get("clock")  # the server's clock at welcome: roughly mid-way through the hello
        offset = clock - (asked + answered) // 2 if clock is not None else 0
        return cls(stream, proto, reply, stats, address, offset)

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
        except GONE as e:
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
            close_now(self.stream)
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
        waiters, self._waiters = self._waiters, {}
        for w in waiters.values():
            w.error = exc
            w.done()

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
            if msg.kind == "run":
                waiter.cancel_id = req_id
        if msg.kind == "run" and self._frees:
            msg.fields["frees"], self._frees = self._frees, []
        if not self._queued and on_sent is None and self._send_now(msg, waiter, size):
            return waiter
        self._queued += 1
        self._outbox.send_nowait((msg, waiter, on_sent))
        return waiter

    def _encode(self, msg: Message, waiter: Waiter | None) -> list | None:
        """The frame's bytes, or None when the protocol refuses it: nothing was written, so only
        this request fails."""
        try:
            return self.proto.send(msg)
        except LocalProtocolError as e:
            if waiter is not None:
                self._waiters.pop(msg.fields["id"], None)
                waiter.error = e
                waiter.done()
            return None

    def _send_now(self, msg: Message, waiter: Waiter | None, size: int) -> bool:
        """Nothing is queued before it: write a small frame straight away, from this task, rather
        than through the write task (a pass of the loop). What the socket does not take at once goes
        first in the outbox. False: the write task must take the whole message."""
        raw = self._raw
        if raw is None or size > SMALL_FRAME:
            return False
        parts = self._encode(msg, waiter)
        if parts is None:
            return True
        rest = send_now(raw, parts)
        if msg.kind != "ping":
            self._touch()
        self.stats.bytes_sent += msg.nbytes
        if rest:
            self._queued += 1
            self._outbox.send_nowait((rest, None, None))
        return True

    async def wait(self, waiter: Waiter) -> Message:
        try:
            await waiter.event.wait()
        except trio.Cancelled:
            self.abandon(waiter)
            raise
        return self.outcome(waiter)

    def outcome(self, waiter: Waiter) -> Message:
        """The reply of a waiter that is done; its error, or the server's, raised."""
        if waiter.error is not None:
            raise waiter.error
        reply = waiter.reply
        assert reply is not None
        self.stats.round_trips += 1
        if reply.kind == "error":
            raise error_from_message(reply)
        return reply

    def abandon(self, waiter: Waiter) -> None:
        """Its caller stopped waiting: a result's values are let go, a run still going is cancelled."""
        if waiter.abandoned:
            return
        waiter.notify = None
        reply = waiter.reply
        if reply is not None and reply.kind == "result" and waiter.orphan is not None:
            waiter.orphan(reply)
        elif reply is None and waiter.error is None and waiter.cancel_id and not self.closed:
            # stop the server's work too; its reply still comes, and is dropped as abandoned
            self.post(Message("cancel", {"id": waiter.cancel_id}), reply=False)
        waiter.abandoned = True

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

    # -- the direct path: a blocked caller's own thread, while the owner's loop is paused ---------
    def direct_ready(self) -> bool:
        """Whether a caller may write a request and read its reply itself now (the loop paused:
        ``Bridge.paused``): a plain socket, nothing in flight or queued, no frame half read."""
        return (self._raw is not None and not self.closed and not self._gone and not self._waiters
                and not self._queued and self.proto.between_frames)

    def hand_over(self, waiter: Waiter) -> None:
        """The loop's reader takes ``waiter``'s reply from here (it calls ``waiter.notify``); from
        a caller's thread while the loop is paused (``runtime._direct``)."""
        self._waiters[waiter.cancel_id] = waiter

    def broken(self, exc: BaseException) -> None:
        """The link broke under the direct path: closed for good (the loop fails what it has in
        flight as it runs again), and ``exc`` raised here."""
        if not self._gone:
            self._gone = True
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._lose, exc)
        raise exc

    # -- tasks ----------------------------------------------------------------------------------
    async def read_loop(self) -> None:
        while True:
            msg = await receive_message(self.stream, self.proto, self._touch)
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
                raise error_from_message(msg) if msg["kind"] == "protocol" else \
                    ConnectionLostError(f"the genie server closed the connection: {msg['message']}")
            w = self._waiters.pop(req_id, None)
            if w is None:
                continue  # a pong, or the reply of a request nobody waits for
            if w.abandoned:
                if w.orphan is not None and msg.kind == "result":
                    w.orphan(msg)
                continue
            w.reply = msg
            w.done()

    async def write_loop(self) -> None:
        async for msg, waiter, on_sent in self._outbox_recv:
            try:
                await self._write(msg, waiter, on_sent)
            finally:
                self._queued -= 1

    async def _write(self, msg: Message | memoryview, waiter: Waiter | None,
                     on_sent: Callable[[int], None] | None) -> None:
        if isinstance(msg, memoryview):  # the rest of a frame ``_send_now`` began
            await send_parts(self.stream, [msg], self._touch)
            return
        parts = self._encode(msg, waiter)
        if parts is None:
            return
        # sending counts as life (a slow link's long upload), but not our own pings
        t0 = time.perf_counter_ns()
        await send_parts(self.stream, parts, None if msg.kind == "ping" else self._touch, on_sent)
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
            await trio.sleep(min(PING_AFTER, DEAD_AFTER, KEEPALIVE) / 2)
            quiet = trio.current_time() - self._last_io
            if not self._waiters:
                if quiet > KEEPALIVE and self.holds_values():
                    self._touch()  # one keepalive per period; its pong is not awaited
                    self.post(Message("ping", {"id": next(self._ids)}), reply=False)
                continue
            if quiet > DEAD_AFTER:
                raise ConnectionLostError(f"the genie server at {self.address} has not answered for "
                                          f"{quiet:.0f} s")
            if quiet > PING_AFTER:
                self.post(Message("ping", {"id": next(self._ids)}), reply=False)

    def _touch(self) -> None:
        self._last_io = trio.current_time()


async def _tls_handshake(stream: trio.SSLStream, address: str, mismatch: str) -> None:
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as e:
        cause = e.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise ConnectionLostError(
                f"the genie server at {address} failed TLS verification: {cause.verify_message}; its "
                "certificate must be signed by a CA in tls= (a CA bundle path) and name this host") from e
        raise ConnectionLostError(f"TLS handshake with the genie server at {address} failed "
                                  f"({cause or e}); {mismatch}") from e
