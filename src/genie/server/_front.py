"""``genie serve``'s front process: listen, TLS, the hello and its token, then hand the connection to
its tenant's worker process. It never runs a client op.

Call tree::

    run_server(Config)                  checks the config, forks the zygote (``_workers``), trio.run
      serve(config)
        listen -> exposure check (no token: loopback only, unless --insecure)
        start each known tenant's worker; a worker that cannot start (no such device) fails here
        print "genie serve listening on HOST:PORT"
        serve_listeners(front.handle)   one task per connection:
          at most --max-unauthenticated at once (the oldest goes for a new one), each with
          --hello-timeout to say hello
          _greet: (TLS handshake) hello -> version and token -> tenant, or an error reply and close
          at most --max-connections adopted at once
          plain TCP: the socket itself goes to the tenant's worker (SCM_RIGHTS): no extra hop
          TLS: the worker gets one end of a local socket pair; this process relays the decrypted
               bytes (the TLS session cannot move between processes)
        signals: SIGINT/SIGTERM stop cleanly; SIGHUP re-reads --tokens
        watch_stdin()                   embedded mode: the parent went away -> shut down

A worker that dies (a crash, an OOM kill, a CUDA device-side assert) takes only its own tenant's
connections with it: this process logs how it ended, and the tenant's next connection starts a new
worker.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import itertools
import os
import signal
import socket
import sys
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import trio

from genie._errors import AuthenticationError, RemoteProtocolError, WeightsError
from genie.server._peers import transfer_tenant
from genie.server._serve import Config, ConfigError, tls_context
from genie.server._store import WeightStore
from genie.server._tenants import Tenants, TokensError
from genie.server._workers import arecv_control, asend_control, start_zygote
from genie.transport import PREFIX, SERVER, VERSION, Message, Protocol, error_message, send_parts

RELAY_CHUNK = 256 << 10


@dataclass
class Worker:
    """The front's view of one tenant's worker process."""

    tenant: str
    pid: int
    ctrl: trio.socket.SocketType
    device: str = ""
    conns: set[int] = field(default_factory=set)
    alive: bool = True


class Front:
    def __init__(self, config: Config, tenants: Tenants, zygote: socket.socket) -> None:
        self.config = config
        self.limits = config.limits
        self.tenants = tenants
        self.tls = tls_context(config)
        self.verbose = config.verbose
        self.zygote = trio.socket.from_stdlib_socket(zygote)
        self.workers: dict[str, Worker] = {}
        self._spawning: dict[str, trio.Event] = {}
        self._spawned = trio.open_memory_channel[tuple[int, int]](1)
        self._spawn_lock = trio.Lock()
        self.greeting: OrderedDict[int, trio.CancelScope] = OrderedDict()  # yet to say hello, oldest first
        self.adopted = 0
        self.stats: Counter[str] = Counter()
        self._ids = itertools.count(1)

    def log(self, text: str, *, always: bool = False) -> None:
        if always or self.verbose:
            print(f"genie serve: {text}", file=sys.stderr, flush=True)

    # -- workers ------------------------------------------------------------------------------------
    async def zygote_loop(self) -> None:
        """Replies to spawns, and how each worker ended."""
        while True:
            msg, fd = await arecv_control(self.zygote)
            if msg is None:
                self.log("the worker zygote ended: no new tenant worker can start", always=True)
                return
            if "spawned" in msg and fd is not None:
                await self._spawned[0].send((int(msg["spawned"]), fd))
            elif "exited" in msg:
                pid = msg["exited"]
                for w in self.workers.values():
                    if w.pid == pid:
                        self.log(f"tenant {w.tenant!r}'s worker (pid {pid}) {msg.get('how', 'ended')}; "
                                 f"{len(w.conns)} connection(s) lost with it", always=True)

    async def worker(self, tenant: str, nursery: trio.Nursery) -> Worker:
        """The tenant's live worker, started (and waited for) if there is none."""
        w = self.workers.get(tenant)
        if w is not None and w.alive:
            return w
        async with self._spawn_lock:
            w = self.workers.get(tenant)
            if w is not None and w.alive:
                return w
            await asend_control(self.zygote, {"spawn": tenant})
            pid, fd = await self._spawned[1].receive()
            ctrl = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
            msg, _ = await arecv_control(ctrl)
            if msg is None or "ready" not in msg:
                ctrl.close()
                why = msg.get("failed") if msg else "it ended before it was ready"
                raise ConfigError(f"tenant {tenant!r}'s worker could not start: {why}")
            w = self.workers[tenant] = Worker(tenant, pid, ctrl, str(msg["ready"]))
            self.stats["workers_started"] += 1
            self.log(f"tenant {tenant!r}: worker pid {pid} on {w.device}")
            nursery.start_soon(self._watch, w)
            return w

    async def _watch(self, w: Worker) -> None:
        """Connections the worker closed; its end (a crash) when its channel closes."""
        while True:
            msg, fd = await arecv_control(w.ctrl)
            if fd is not None:
                os.close(fd)
            if msg is None:
                break
            if "closed" in msg and msg["closed"] in w.conns:
                w.conns.discard(msg["closed"])
                self.adopted -= 1
        w.alive = False
        self.adopted -= len(w.conns)
        self.stats["workers_lost"] += 1
        w.ctrl.close()

    # -- connections ---------------------------------------------------------------------------------
    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = "{}:{}".format(*stream.socket.getpeername()[:2])
        except OSError:
            peer = "?"
        lim = self.limits
        self.log(f"{peer}: accepted")
        if len(self.greeting) >= lim.max_unauthenticated:
            # full of connections yet to say hello: the oldest has had the longest to do it and
            # goes, so silent sockets cannot lock honest clients out (they say hello in a round trip)
            _, oldest = self.greeting.popitem(last=False)
            oldest.cancel()
            self.stats["evicted_unauthenticated"] += 1
        key = next(self._ids)
        scope = self.greeting[key] = trio.CancelScope(deadline=trio.current_time() + lim.hello_timeout)
        greeted = None
        try:
            with scope:
                greeted = await self._greet(stream, peer)
            if scope.cancelled_caught:
                self.log(f"{peer}: closed: no hello within {lim.hello_timeout:g} s, or evicted by newer "
                         "connections (--hello-timeout, --max-unauthenticated)")
        finally:
            self.greeting.pop(key, None)
        if greeted is None:
            await _close(stream)
            return
        tenant, tls_stream, proto, transfer = greeted
        try:
            if self.adopted >= lim.max_connections:
                self.stats["refused_connections"] += 1
                raise _Refusal(f"the server has {self.adopted} connections open (--max-connections)")
            w = await self.worker(tenant, self._nursery)
        except (_Refusal, ConfigError) as e:
            self.log(f"{peer}: refused: {e}")
            with contextlib.suppress(*_GONE):
                await send_parts(tls_stream or stream.socket, proto.send(error_message(0, _Refusal(str(e)))))
            await _close(tls_stream or stream)
            return
        conn_id = next(self._ids)
        w.conns.add(conn_id)
        self.adopted += 1
        self.stats["connections"] += 1
        # a peer server's transfer connection can only claim the one value its token names
        adopt = {"adopt": conn_id, "peer": peer} | ({"transfer": transfer} if transfer else {})
        if tls_stream is None:
            with contextlib.suppress(*_GONE):
                await asend_control(w.ctrl, adopt, stream.socket.fileno())
            stream.socket.close()  # the worker holds its own descriptor of this socket now
            return
        await self._relay(tls_stream, w, {**adopt, "peer": f"{peer} (TLS)"})

    async def _greet(self, stream: trio.SocketStream, peer: str
                     ) -> tuple[str, trio.SSLStream | None, Protocol, str | None] | None:
        """The tenant a new connection's hello names (after the TLS handshake, if any), and the secret
        of a peer server's transfer token (``_peers``) or None; None after telling the client why not
        (a refused token, another protocol version) or when it never said hello properly."""
        conn: trio.SSLStream | trio.socket.SocketType = stream.socket
        if self.tls is not None:
            conn = trio.SSLStream(stream, self.tls, server_side=True, https_compatible=True)
            try:
                await conn.do_handshake()
            except trio.BrokenResourceError as e:  # not TLS (a plain client), or a TLS alert
                self.log(f"{peer}: refused: TLS handshake failed: {e.__cause__ or e}")
                return None
        proto = Protocol(SERVER, max_header=self.limits.greeting_max_header)
        try:
            msg = await _read_hello(conn, proto)
        except RemoteProtocolError as e:
            self.log(f"{peer}: refused: bad greeting: {e}")
            return None
        except _GONE:
            return None
        if msg is None:
            self.log(f"{peer}: refused: closed by the client before its hello")
            return None
        lent = transfer_tenant(msg["token"], self.tenants.names) if msg["version"] == VERSION else None
        tenant, problem = (lent[0], None) if lent is not None else self._check_hello(msg)
        if problem is not None:
            self.stats["refused_hellos"] += 1
            self.log(f"{peer}: refused: {problem}")
            with contextlib.suppress(*_GONE):
                await send_parts(conn, proto.send(error_message(0, problem)))
            return None
        self.log(f"{peer}: hello ok (protocol {VERSION}, tenant {tenant!r})")
        return (tenant, (conn if self.tls is not None else None), proto,  # type: ignore[return-value]
                lent[1] if lent is not None else None)

    def _check_hello(self, msg: Message) -> tuple[str, Exception | None]:
        if msg["version"] != VERSION:
            return "", RemoteProtocolError(f"server speaks version {VERSION}, client {msg['version']}")
        if self.tenants.checked and not msg["token"]:
            return "", AuthenticationError("this server requires a token, and none was sent (set "
                                           "GENIE_TOKEN, or pass token= to genie.connect)")
        tenant = self.tenants.tenant_of(msg["token"])
        if tenant is None:
            return "", AuthenticationError("bad token")
        return tenant, None

    async def _relay(self, tls_stream: trio.SSLStream, w: Worker, adopt: dict) -> None:
        """Pump decrypted bytes between the TLS stream and a local socket the worker serves."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await asend_control(w.ctrl, adopt, theirs.fileno())
        except _GONE:
            ours.close()
            return
        finally:
            theirs.close()
        local = trio.socket.from_stdlib_socket(ours)

        async def inbound() -> None:
            while data := await tls_stream.receive_some(RELAY_CHUNK):
                await _send_all(local, data)

        async def outbound() -> None:
            while data := await local.recv(RELAY_CHUNK):
                await tls_stream.send_all(data)

        async def pump(direction) -> None:
            with contextlib.suppress(*_GONE):
                await direction()
            nursery.cancel_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, inbound)
                nursery.start_soon(pump, outbound)
        finally:
            local.close()
            await _close(tls_stream)

    # -- tokens ----------------------------------------------------------------------------------------
    def reload_tokens(self) -> None:
        path = self.config.tokens_file
        if path is None:
            self.log("SIGHUP: no --tokens file to re-read", always=True)
            return
        try:
            self.tenants = Tenants.load(path)
        except TokensError as e:
            self.log(f"SIGHUP: kept the old tokens: {e}", always=True)
            return
        self.log(f"SIGHUP: re-read {path}: tenants {', '.join(self.tenants.names)}", always=True)


class _Refusal(RemoteProtocolError):
    """A connection the server will not take now (it is full, or its worker would not start)."""


_GONE = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view):]


async def _read_hello(conn: trio.SSLStream | trio.socket.SocketType, proto: Protocol) -> Message | None:
    """The hello, read byte-exactly (its prefix, then its header: a greeting carries no payload), so
    nothing the client sends after it is read here: those bytes are the worker's."""
    async def exactly(n: int) -> bytes | None:
        got = bytearray()
        while len(got) < n:
            chunk = await (conn.recv(n - len(got)) if isinstance(conn, trio.socket.SocketType)
                           else conn.receive_some(n - len(got)))
            if not chunk:
                return None
            got += chunk
        return bytes(got)

    prefix = await exactly(PREFIX.size)
    if prefix is None:
        return None
    proto.receive_data(prefix)
    proto.next_event()  # NEED_DATA, once the magic, the version and the header's size are checked
    head = await exactly(PREFIX.unpack(prefix)[3])
    if head is None:
        return None
    proto.receive_data(head)
    msg = proto.next_event()
    if not isinstance(msg, Message):
        raise RemoteProtocolError("a hello must be one frame with no payload")
    return msg


async def _close(stream: trio.abc.AsyncResource) -> None:
    with contextlib.suppress(*_GONE):
        await trio.aclose_forcefully(stream)


def _exposed(listeners: list[trio.SocketListener]) -> list[str]:
    """Addresses among ``listeners`` that another machine could reach (not loopback)."""
    out = []
    for lst in listeners:
        host = lst.socket.getsockname()[0]
        if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            out.append(host)
    return out


async def serve(config: Config, tenants: Tenants, zygote: socket.socket) -> None:
    front = Front(config, tenants, zygote)
    try:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    except OSError as e:
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    exposed = _exposed(listeners)
    if exposed and not tenants.checked:
        if not config.insecure:
            for lst in listeners:
                lst.socket.close()
            raise ConfigError(f"refusing to listen on {', '.join(exposed)} without a token: anyone who "
                              "can reach it could run programs on this accelerator. Set --token (or "
                              "$GENIE_TOKEN) or --tokens, listen on 127.0.0.1, or pass --insecure to "
                              "accept any client")
        front.log(f"WARNING: listening on {', '.join(exposed)} with no token (--insecure): anyone who can "
                  "reach this port can run programs here", always=True)
    async with trio.open_nursery() as nursery:
        front._nursery = nursery
        nursery.start_soon(front.zygote_loop)
        nursery.start_soon(_signals, front, nursery.cancel_scope)
        for tenant in tenants.names:  # a device that cannot start fails here, before listening
            w = await front.worker(tenant, nursery)
        host, port = listeners[0].socket.getsockname()[:2]
        print(f"genie serve listening on {host}:{port}", flush=True)  # parents parse this line
        if config.verbose or not config.exit_on_stdin_eof:  # an embedded server stays quiet
            front.log(f"device {w.device}, memory limit {config.limits.memory_limit or 'none'} per tenant, "
                      f"tenants {', '.join(tenants.names)}{', TLS' if front.tls else ''}", always=True)
        if config.exit_on_stdin_eof:
            nursery.start_soon(_watch_stdin, nursery.cancel_scope)
        await nursery.start(trio.serve_listeners, front.handle, listeners)


async def _signals(front: Front, scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for sig in signals:
            if sig == signal.SIGHUP:
                front.reload_tokens()
                continue
            front.log(f"stopping ({signal.Signals(sig).name})", always=front.verbose)
            scope.cancel()
            return


async def _watch_stdin(scope: trio.CancelScope) -> None:
    def read_to_eof() -> None:
        while sys.stdin.buffer.read(1 << 16):
            pass

    await trio.to_thread.run_sync(read_to_eof, abandon_on_cancel=True)
    scope.cancel()


def run_server(config: Config) -> None:
    """Serve until stopped (SIGINT, SIGTERM, or stdin's end in embedded mode). ConfigError when the
    settings are refused: named in its message, before anything listens."""
    if config.tokens_file is not None and config.token:
        raise ConfigError("give either --token (one tenant) or --tokens FILE (many), not both")
    try:
        tenants = Tenants.load(config.tokens_file) if config.tokens_file else Tenants.single(config.token)
    except TokensError as e:
        raise ConfigError(str(e)) from None
    tls_context(config)  # bad certificate files fail here
    if config.weights is not None:
        try:
            WeightStore(config.weights)
        except WeightsError as e:
            raise ConfigError(str(e)) from None
    # Everything imported so far lives as long as the server: keep it out of the cyclic GC's full
    # passes (a full pass costs ~10 ms while a large plan is built), and shared with the workers
    # the zygote forks (copy on write).
    gc.collect()
    gc.freeze()
    zygote = start_zygote(config)
    try:
        trio.run(serve, config, tenants, zygote)
    except BaseExceptionGroup as group:  # a nursery's: the first refusal is the operator's answer
        refused = group.subgroup(ConfigError)
        if refused is None:
            raise
        raise _first(refused) from None
    finally:
        zygote.close()


def _first(group: BaseExceptionGroup) -> BaseException:
    e: BaseException = group
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e
