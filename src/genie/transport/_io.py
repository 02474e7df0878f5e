"""The one piece of I/O beside the pure protocol: move a ``Protocol``'s bytes over a trio stream.

Both ends use it, over either kind of stream:

- a plain trio socket: payloads land by ``recv_into`` straight in the buffer the protocol hands out
  (no copy), and parts go out with ``send`` in place;
- a ``trio.SSLStream`` (TLS): it has no ``recv_into``, so bytes come by ``receive_some`` and the
  protocol copies them into place (``receive_data``); parts go out with ``send_all``.

Inner APIs take no timeout: callers wrap them in ``trio.fail_after``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import trio

from genie.transport._protocol import CLOSED, NEED_DATA, Message, Protocol

Stream = trio.socket.SocketType | trio.abc.Stream
RECV_SIZE = 256 << 10
COALESCE = 64 << 10  # small parts of one frame go out in one send
SEND_CHUNK = 8 << 20  # progress granularity of big buffers, when someone counts progress
GONE = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)  # the link broke or was closed


async def receive_message(stream: Stream, proto: Protocol,
                          touch: Callable[[], None] | None = None) -> Message | None:
    """The next message, or None when the peer closed cleanly between frames. ``touch()`` runs after
    every read (the peer is alive). Broken bytes raise RemoteProtocolError."""
    started = 0
    sock = stream if isinstance(stream, trio.socket.SocketType) else None
    while True:
        ev = proto.next_event()
        if ev is CLOSED:
            return None
        if ev is not NEED_DATA:
            ev.received_ns = time.perf_counter_ns()  # type: ignore[union-attr]
            ev.started_ns = started or ev.received_ns  # type: ignore[union-attr]
            return ev  # type: ignore[return-value]
        buf = proto.receive_buffer() if sock is not None else None
        if buf is not None:
            proto.received_into(await sock.recv_into(buf))  # type: ignore[union-attr]
        elif sock is not None:
            proto.receive_data(await sock.recv(RECV_SIZE))
        else:
            proto.receive_data(await stream.receive_some(RECV_SIZE))  # type: ignore[union-attr]
        started = started or time.perf_counter_ns()
        if touch is not None:
            touch()


async def send_parts(stream: Stream, parts: list, touch: Callable[[], None] | None = None,
                     on_sent: Callable[[int], None] | None = None) -> None:
    """Write one frame's parts (``Protocol.send``): small ones joined into one send, big buffers in
    place. ``touch()`` runs after every write, ``on_sent(n)`` after every ``n`` bytes (a progress
    bar: big buffers then go in SEND_CHUNK pieces)."""
    small: list = []
    for p in parts:
        if len(p) < COALESCE:
            small.append(p)
            continue
        if small:
            await _send_all(stream, memoryview(b"".join(small)), touch, on_sent)
            small = []
        await _send_all(stream, memoryview(p).cast("B"), touch, on_sent)
    if small:
        await _send_all(stream, memoryview(b"".join(small)), touch, on_sent)


async def _send_all(stream: Stream, mv: memoryview, touch: Callable[[], None] | None,
                    on_sent: Callable[[int], None] | None) -> None:
    sock = stream if isinstance(stream, trio.socket.SocketType) else None
    while mv:
        piece = mv[:SEND_CHUNK] if on_sent is not None else mv
        if sock is not None:
            n = await sock.send(piece)
        else:
            await stream.send_all(piece)  # type: ignore[union-attr]
            n = len(piece)
        mv = mv[n:]
        if touch is not None:
            touch()
        if on_sent is not None:
            on_sent(n)


def writable_now(stream: Stream) -> socket.socket | None:
    """The socket under ``stream`` that ``send_now`` can write to, or None (TLS)."""
    raw = getattr(stream, "_sock", None)  # a trio socket wraps the stdlib one it writes through
    return raw if isinstance(stream, trio.socket.SocketType) and isinstance(raw, socket.socket) else None


def send_now(raw: socket.socket, parts: list) -> memoryview:
    """Write one small frame's parts without waiting, as far as the socket takes them at once (all
    of it, when the peer keeps up); returns what is left, for the send task to finish before
    anything else. A hop through a send task costs a pass of the event loop (tens of us): a small
    frame with nothing queued before it need not wait for that. The caller holds the event loop's
    thread, so this cannot interleave with the send task's own writes."""
    data = memoryview(b"".join(parts))
    try:
        n = raw.send(data)
    except OSError:  # would block, or broken: the send task meets the same and reports it as usual
        n = 0
    return data[n:]


def close_now(stream: Stream) -> None:
    """Close at once, without a goodbye (no TLS close_notify: the peer sees a plain end of stream,
    which the protocol already checks for a frame cut short)."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        stream = stream.socket
    if isinstance(stream, trio.socket.SocketType):
        stream.close()


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free now (bound together, then let go): for servers whose
    addresses must be known before they start (peers that list each other)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
