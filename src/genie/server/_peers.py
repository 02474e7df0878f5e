"""Server to server: a kept value is lent under a one-shot token, and a peer server pulls it.

``x.to("remote_accelerator:j")`` for a value on server i moves its bytes from i to j without passing
through the client (the values one program moves from i to j go together, under one token)::

    client -> i: lend {handles}     after the requests that keep or write them (a ticket), i puts the
                                    values under a fresh token "genie-transfer.<tenant>.<secret>"
                                    (LEND_MAX per connection, LEND_TTL seconds) -> lent {token, nbytes}
    client -> j: pull {peer: i's address, token, names, dtypes, shapes}   (in arrival order: a later
                 run reading one of ``names`` waits for it)
      j: the peer must be in j's own allowlist (``--peers``), else refused before any connection
      j -> i: hello {token: the transfer token}
      i's front: a transfer token names its tenant; the connection goes to that tenant's worker
                 marked as a transfer: it can do nothing but claim its values (``serve_lent``)
      i's worker: pops the secret (one shot) -> value (the bytes), then closes; a bad or used
                  secret -> an AuthenticationError reply, and nothing is lost
      j: checks dtypes and shapes against what the client declared (bounded before a byte is read),
         keeps them under ``names``, counted against j's memory like any kept value -> done

SSRF: a client cannot make a server connect where it likes. j connects only to an address in its
own allowlist (``genie serve --peers h:p,h:p``, the pool's addresses), compared as host:port strings
before any name is resolved; without ``--peers`` a server pulls from nobody. The only bytes j sends
there are a genie hello holding the token, and it reads back at most the declared value.

A token reads only the values its lend named, once: it is a 128-bit secret, popped on first use,
scoped to the tenant whose connection lent it, and it carries no other right (the transfer connection
runs no request). Lent values are the kept tensors themselves (no copy): until they are claimed (or
LEND_TTL passes), the lending connection's later requests that touch them wait (a ``hold`` ticket),
so a write the client makes after ``.to()`` is never seen by the peer.
"""

from __future__ import annotations

import math
import secrets
import socket
import time
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
import trio

from genie._dtypes import DTYPES
from genie._errors import AuthenticationError, GenieError, RemoteMemoryError, RemoteProtocolError
from genie.transport import (
    CLIENT,
    GONE,
    SERVER,
    VERSION,
    Message,
    Protocol,
    State,
    error_from_message,
    error_message,
    receive_message,
    send_parts,
)

if TYPE_CHECKING:
    from genie.server._handler import ConnectionHandler
    from genie.server._requests import Pending
    from genie.server._serve import Server

TRANSFER_PREFIX = "genie-transfer."
LEND_MAX = 16  # outstanding lends per connection: the oldest goes first
LEND_TTL = 120.0  # seconds a lent value waits to be pulled
PULL_TIMEOUT = 120.0  # seconds a pull may take: connect, hello, the bytes
HEADER_SLACK = 64 << 10  # a value frame's header and padding, beyond its bytes


class _Lent:
    __slots__ = ("conn", "values", "at", "done")

    def __init__(self, conn: int) -> None:
        self.conn, self.values, self.at = conn, [], time.monotonic()
        self.done = trio.Event()  # claimed and sent, refused, or expired: the hold lets go


# per tenant server (one per worker process, but tests may hold several): secret -> the lent value
_LENT: weakref.WeakKeyDictionary[Server, OrderedDict[str, _Lent]] = weakref.WeakKeyDictionary()


def parse_peers(text: str | None) -> frozenset[str]:
    """``--peers h:p,h:p`` -> the allowlist, each entry "host:port" (IPv6 hosts in brackets)."""
    out = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--peers: {part!r} is not host:port")
        out.add(f"{host}:{int(port)}")
    return frozenset(out)


def transfer_tenant(token: str, tenants: list[str]) -> tuple[str, str] | None:
    """(tenant, secret) of a transfer token whose tenant this server has, else None."""
    if not token.startswith(TRANSFER_PREFIX):
        return None
    tenant, _, secret = token[len(TRANSFER_PREFIX):].rpartition(".")
    if tenant not in tenants or len(secret) != 32:
        return None
    return tenant, secret


def _lent(server: Server) -> OrderedDict[str, _Lent]:
    table = _LENT.get(server)
    if table is None:
        table = _LENT[server] = OrderedDict()
    return table


def _expire(table: OrderedDict[str, _Lent], conn: int) -> None:
    now = time.monotonic()
    for secret in [s for s, e in table.items() if now - e.at > LEND_TTL]:
        table.pop(secret).done.set()
    mine = [s for s, e in table.items() if e.conn == conn]
    for secret in mine[: max(0, len(mine) - LEND_MAX + 1)]:
        table.pop(secret).done.set()


async def on_lend(conn: ConnectionHandler, msg: Message) -> Pending:
    """Lend kept values to a peer: after the requests that keep or write them, as a fetch waits."""
    from genie.server._requests import Pending

    handles = msg["handles"]
    if not 0 < len(handles) <= conn.server.limits.max_buffers:
        raise RemoteProtocolError("lend message: between one handle and --max-buffers")
    keys, producers = conn.order.reads(handles)
    ticket = conn.order.admit(msg["id"], keys, producers)
    lent = _Lent(id(conn))
    # later requests touching these values wait until the peer has them (or they expire)
    hold = conn.order.admit(msg["id"], keys)

    async def held() -> None:
        await hold.wait()  # the lend itself
        with trio.move_on_after(LEND_TTL):
            await lent.done.wait()

    conn.start(Pending(hold, held), None)

    async def work() -> Message:
        try:
            await ticket.wait()
            values = [conn.residents.get(h) for h in handles]
            missing = [h for h, t in zip(handles, values, strict=True) if t is None]
            if missing:
                raise GenieError(f"handle {missing[0]} is not resident on this connection")
        except BaseException:
            lent.done.set()
            raise
        table = _lent(conn.server)
        _expire(table, id(conn))
        secret = secrets.token_hex(16)
        lent.values = values  # type: ignore[assignment]
        table[secret] = lent
        conn.server.stats["lent"] += len(values)
        token = f"{TRANSFER_PREFIX}{conn.server.tenant}.{secret}"
        nbytes = sum(t.numel() * t.element_size() for t in values)  # type: ignore[union-attr]
        return Message("lent", {"id": msg["id"], "token": token, "nbytes": nbytes})

    return Pending(ticket, work)


async def serve_lent(server: Server, sock: trio.socket.SocketType, secret: str, peer: str) -> None:
    """A peer's transfer connection (its hello held a transfer token): its values, then close."""
    proto = Protocol(SERVER, max_frame=server.max_frame, state=State.GREETED)
    claimed: _Lent | None = None
    try:
        with trio.fail_after(PULL_TIMEOUT):
            welcome = {"version": VERSION, "device": str(server.device), "max_frame": server.max_frame}
            await send_parts(sock, proto.send(Message("welcome", welcome)))
            entry = _lent(server).pop(secret, None)
            if entry is not None and time.monotonic() - entry.at > LEND_TTL:
                entry = None  # expired
            if entry is None:
                server.stats["refused_transfers"] += 1
                err = AuthenticationError("bad or already used transfer token")
                await send_parts(sock, proto.send(error_message(0, err)))
                return
            claimed = entry
            host = await trio.to_thread.run_sync(server.device.to_host, entry.values) if server.device.cuda \
                else entry.values
            values = [t.contiguous() for t in host]
            await send_parts(sock, proto.send(Message("value", {"id": 0}, values)))
            server.stats["transferred_bytes"] += sum(t.numel() * t.element_size() for t in values)
    except (*GONE, trio.TooSlowError):
        pass
    finally:
        if claimed is not None:  # sent (or the peer went away): the lender's later writes may go on
            claimed.done.set()
        sock.close()


async def on_pull(conn: ConnectionHandler, msg: Message) -> Pending:
    """Pull values a peer lent, and keep them under the client's ``names`` (in arrival order: a
    later run reading one waits for it)."""
    from genie.server._requests import Pending

    server = conn.server
    peer, names = msg["peer"], msg["names"]
    dtypes = [DTYPES.get(d) for d in msg["dtypes"]]
    shapes = msg["shapes"]
    if not 0 < len(names) == len(dtypes) == len(shapes) <= server.limits.max_buffers \
            or any(d is None for d in dtypes) or any(len(s) > 64 or any(n < 0 for n in s) for s in shapes):
        raise RemoteProtocolError("pull message: names, dtypes and shapes must match, one per value "
                                  "(plain dtypes, at most --max-buffers)")
    if not msg["token"].startswith(TRANSFER_PREFIX):  # never a client's own token: j would be its client
        raise AuthenticationError("pull message: that is not a transfer token (the peer's lend gives one)")
    allowed: frozenset[str] = getattr(server.config, "peers", frozenset())
    if peer not in allowed:
        raise AuthenticationError(f"this server pulls only from its --peers allowlist, and {peer!r:.100} "
                                  f"is not in it ({', '.join(sorted(allowed)) or 'empty'})")
    nbytes = sum(math.prod(s) * d.itemsize for s, d in zip(shapes, dtypes, strict=True))  # type: ignore[union-attr]
    if nbytes + HEADER_SLACK > server.max_frame:
        raise RemoteMemoryError(f"pulled values of {nbytes} bytes are more than this server's --max-frame "
                                f"({server.max_frame})")
    if server.pool.limit and nbytes > server.pool.limit:
        raise RemoteMemoryError(f"pulled values of {nbytes} bytes are more than this server's --memory-limit "
                                f"({server.pool.limit})")
    checked = conn.residents.check_names(names, len(names), conn.order.live)
    ticket = conn.order.admit(msg["id"], set(), names=checked or ())

    async def work() -> Message:
        try:
            await ticket.wait()
            with trio.fail_after(PULL_TIMEOUT):
                values = await _receive(peer, msg["token"], nbytes, len(names))
            for t, d, s in zip(values, dtypes, shapes, strict=True):
                if t.dtype != d or list(t.shape) != list(s):  # the client named other values
                    raise GenieError(f"peer {peer} sent a {t.dtype} {list(t.shape)} value; the client "
                                     f"declared {d} {list(s)} (a client bug: the token was spent)")
            if server.device.cuda:
                values = [await trio.to_thread.run_sync(server.device.to_device, t) for t in values]
            conn.residents.keep(values, names)
        except trio.TooSlowError:
            for h in names:
                conn.order.forget(h, msg["id"])
            raise GenieError(f"pulling from peer {peer} took more than {PULL_TIMEOUT:g} s") from None
        except BaseException:
            for h in names:
                conn.order.forget(h, msg["id"])
            raise
        server.stats["pulled_bytes"] += nbytes
        return Message("done", {"id": msg["id"]})

    return Pending(ticket, work)


def _uninitialized(n: int) -> memoryview:
    return memoryview(torch.empty(n, dtype=torch.uint8).numpy()).cast("B")


async def _receive(peer: str, token: str, nbytes: int, n: int) -> list[torch.Tensor]:
    host, _, port = peer.rpartition(":")
    host = host.strip("[]")
    try:  # a plain socket, not a stream: the value is received with recv_into, in place
        family = (await trio.socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM))[0][0]
        stream = trio.socket.socket(family, socket.SOCK_STREAM)
        await stream.connect((host, int(port)))
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        raise GenieError(f"cannot reach peer {peer}: {e}") from e
    with stream:
        # received into an uninitialized tensor: no zero-fill, and no copy to keep it
        proto = Protocol(CLIENT, max_frame=nbytes + HEADER_SLACK, max_buffers=max(n, 1),
                         allocate=_uninitialized)
        try:
            await send_parts(stream, proto.send(Message("hello", {"version": VERSION, "token": token})))
            replies = []
            for _ in range(2):  # its welcome, then the value (or why not)
                reply = await receive_message(stream, proto)
                if reply is None:
                    raise GenieError(f"peer {peer} closed the transfer connection")
                if reply.kind == "error":
                    raise error_from_message(reply)
                replies.append(reply)
        except GONE as e:
            raise GenieError(f"the transfer connection to peer {peer} broke: {e}") from e
    welcome, value = replies
    if welcome.kind != "welcome" or value.kind != "value" or len(value.buffers) != n \
            or not all(isinstance(b, torch.Tensor) for b in value.buffers):
        raise RemoteProtocolError(f"peer {peer} did not send the {n} values the client declared")
    return value.buffers  # type: ignore[return-value]
