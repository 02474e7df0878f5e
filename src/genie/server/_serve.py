"""``genie serve``: a trio TCP server hosting one accelerator for many client connections.

Call tree::

    run_server(Config)                  trio.run(serve, ...)
      serve(config)
        tls_context(config)             --tls-cert/--tls-key: checked before anything listens
        open_tcp_listeners -> exposure check (no token: loopback only, unless --insecure)
                           -> print "genie serve listening on HOST:PORT"
        serve_listeners(handle)         one task per connection
          ConnectionHandler(server, socket or SSLStream).serve()  (see _handler)
        watch_stdin()                   embedded mode: the parent went away -> shut down

State shared by connections lives on ``Server``: the device, the constant pool (weights uploaded
once per server, shared by all), the template cache, the stage-schedule cache (keyed by the
client's schedule key), the compute limiter, the run-thread limiter and the open-connection count.
Every limit is a row of ``transport.LIMITS``; ``Config.limits`` holds this server's values.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import os
import ssl
import sys
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch
import trio

from genie._errors import GenieError
from genie.graph import StageSchedule, Template
from genie.server._device import Device
from genie.server._handler import ConnectionHandler
from genie.server._residency import ConstantPool
from genie.transport import Limits


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 0
    device: str | None = None
    token: str | None = None
    limits: Limits = field(default_factory=Limits)  # memory, frames, graphs, timeouts, connections
    exit_on_stdin_eof: bool = False  # embedded mode: the parent holds our stdin open
    verbose: bool = False
    tls_cert: str | None = None  # PEM certificate chain: serve TLS only (with tls_key)
    tls_key: str | None = None
    insecure: bool = False  # allow a non-loopback address without a token


class ConfigError(GenieError):
    """The server was started with settings it refuses (the operator's to fix): named in the message."""


class _LRU(OrderedDict):
    """Parsed templates by digest, stage schedules by key: shared by connections; the least
    recently stored go first. Connections decode in worker threads, so a store is locked."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self._lock = threading.Lock()

    def __setitem__(self, key, value) -> None:
        with self._lock:
            super().__setitem__(key, value)
            self.move_to_end(key)
            if len(self) > self.size:
                self.popitem(last=False)


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.limits = lim = config.limits
        # --workers: programs computing at once, across connections (the per-device worker pool);
        # one on a GPU by default (each worker has a stream of its own), a few CPU threads otherwise
        cuda = (config.device or default_device()).startswith("cuda")
        workers = lim.workers or (1 if cuda else max(1, min(4, os.cpu_count() or 1)))
        self.device = Device(config.device or default_device(), streams=workers)
        self.pool = ConstantPool(lim.memory_limit)
        self.token = config.token or ""
        self.tls = tls_context(config)
        self.max_frame = lim.max_frame
        self.verbose = config.verbose
        self.hello_timeout = lim.hello_timeout
        self.templates: _LRU[str, Template] = _LRU(lim.max_templates)
        self.schedules: _LRU[str, StageSchedule] = _LRU(lim.max_templates)  # by the client's key
        self.compute_limiter = trio.CapacityLimiter(workers)
        # a run holds a thread while it computes (a compute slot) or waits for a streamed input (its
        # slot lent out): at most --max-runs of those per connection, so stalled uploads can never
        # starve the others' runs of threads, nor the default limiter (decoding, digests)
        self.run_threads = trio.CapacityLimiter(lim.max_connections * lim.max_runs + workers)
        self.open_connections = 0
        self.stats: Counter[str] = Counter()

    def report(self) -> dict:
        p = self.pool
        return {**self.stats, "device": str(self.device), "constants": len(p),
                "constant_bytes": p.const_bytes, "resident_bytes": p.resident_bytes,
                "evictions": p.evictions, "memory_limit": p.limit or 0, "templates": len(self.templates),
                "schedules": len(self.schedules), "open_connections": self.open_connections,
                "running_bytes": p.running}

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = "{}:{}".format(*stream.socket.getpeername()[:2])
        except OSError:
            peer = "?"
        # plain: the socket itself, so payloads land by recv_into; TLS: the handshake is the
        # connection's, inside its hello timeout. A peer that vanishes without close_notify has
        # simply gone: the framing already refuses a frame cut short.
        conn = stream.socket if self.tls is None else \
            trio.SSLStream(stream, self.tls, server_side=True, https_compatible=True)
        if self.open_connections >= self.limits.max_connections:
            self.stats["refused_connections"] += 1
            if self.verbose:
                print(f"genie serve: {peer}: refused: {self.open_connections} connections already open "
                      "(--max-connections)", file=sys.stderr, flush=True)
            await stream.aclose()
            return
        self.open_connections += 1
        try:
            await ConnectionHandler(self, conn, peer).serve()
        except Exception as e:  # never let one connection take the server down
            print(f"genie serve: {peer}: internal error: {e!r}", file=sys.stderr, flush=True)
        finally:
            self.open_connections -= 1


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context, or None without --tls-cert; bad files fail here, before listening."""
    if config.tls_cert is None and config.tls_key is None:
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the TLS certificate {config.tls_cert!r} and key "
                          f"{config.tls_key!r}: {e}") from e
    return ctx


def _exposed(listeners: list[trio.SocketListener]) -> list[str]:
    """Addresses among ``listeners`` that another machine could reach (not loopback)."""
    out = []
    for lst in listeners:
        host = lst.socket.getsockname()[0]
        if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            out.append(host)
    return out


async def serve(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    server = Server(config)
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    exposed = _exposed(listeners)
    if exposed and not server.token:
        if not config.insecure:
            for lst in listeners:
                lst.socket.close()
            raise ConfigError(f"refusing to listen on {', '.join(exposed)} without a token: anyone who "
                              "can reach it could run programs on this accelerator. Set --token (or "
                              "$GENIE_TOKEN), listen on 127.0.0.1, or pass --insecure to accept any client")
        print(f"genie serve: WARNING: listening on {', '.join(exposed)} with no token (--insecure): anyone "
              "who can reach this port can run programs here", file=sys.stderr, flush=True)
    host, port = listeners[0].socket.getsockname()[:2]
    print(f"genie serve listening on {host}:{port}", flush=True)  # parents parse this line
    if config.verbose or not config.exit_on_stdin_eof:  # an embedded server stays quiet
        print(f"genie serve: device {server.device}, memory limit {config.limits.memory_limit or 'none'}"
              f"{', TLS' if server.tls else ''}", file=sys.stderr, flush=True)
    async with trio.open_nursery() as nursery:
        if config.exit_on_stdin_eof:
            nursery.start_soon(_watch_stdin, nursery.cancel_scope)
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        task_status.started(port)


async def _watch_stdin(scope: trio.CancelScope) -> None:
    def read_to_eof() -> None:
        while sys.stdin.buffer.read(1 << 16):
            pass

    await trio.to_thread.run_sync(read_to_eof, abandon_on_cancel=True)
    scope.cancel()


def run_server(config: Config) -> None:
    # Everything imported so far lives as long as the server: keep it out of the cyclic GC's full
    # passes, which otherwise cost ~10 ms each while a large plan is being built.
    gc.collect()
    gc.freeze()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, config)
