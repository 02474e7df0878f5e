"""``genie serve``: a trio TCP server hosting one accelerator for many client connections.

Call tree::

    run_server(Config)                  trio.run(serve, ...)
      serve(config)
        open_tcp_listeners -> print "genie serve listening on HOST:PORT"
        serve_listeners(handle)         one task per connection
          Connection(server, sock).serve()        (see _conn)
        watch_stdin()                   embedded mode: the parent went away -> shut down

State shared by connections lives on ``Server``: the device, the constant pool (weights uploaded
once per server, shared by all), the template cache, the stage-schedule cache (keyed by the
client's plan key) and the compute limiter.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch
import trio

from genie.graph import StageSchedule
from genie.graph._template import Template
from genie.server._conn import Connection
from genie.server._device import Device
from genie.server._residency import ConstantPool
from genie.transport import DEFAULT_MAX_FRAME

MAX_TEMPLATES = 1024


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 0
    device: str | None = None
    token: str | None = None
    memory_limit: int | None = None
    max_frame: int = DEFAULT_MAX_FRAME
    exit_on_stdin_eof: bool = False  # embedded mode: the parent holds our stdin open
    verbose: bool = False
    hello_timeout: float = 10.0


class _LRU(OrderedDict):
    """Parsed templates by digest, stage schedules by plan key: shared by connections; the least
    recently stored go first."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.device = Device(config.device or default_device())
        self.pool = ConstantPool(config.memory_limit)
        self.token = config.token or ""
        self.max_frame = config.max_frame
        self.verbose = config.verbose
        self.hello_timeout = config.hello_timeout
        self.templates: _LRU[str, Template] = _LRU(MAX_TEMPLATES)
        self.plans: _LRU[str, StageSchedule] = _LRU(MAX_TEMPLATES)  # the client's plan key -> schedule
        # one program at a time on a GPU (streams order the rest); a few at once on CPU threads
        limit = 1 if self.device.cuda else max(1, min(4, os.cpu_count() or 1))
        self.compute_limiter = trio.CapacityLimiter(limit)
        self.stats: Counter[str] = Counter()

    def report(self) -> dict:
        p = self.pool
        return {**self.stats, "device": str(self.device), "constants": len(p),
                "constant_bytes": p.const_bytes, "resident_bytes": p.resident_bytes,
                "evictions": p.evictions, "memory_limit": p.limit or 0, "templates": len(self.templates),
                "plans": len(self.plans)}

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = "{}:{}".format(*stream.socket.getpeername()[:2])
        except OSError:
            peer = "?"
        try:
            await Connection(self, stream.socket, peer).serve()
        except Exception as e:  # never let one connection take the server down
            print(f"genie serve: {peer}: internal error: {e!r}", file=sys.stderr, flush=True)


async def serve(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    server = Server(config)
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    host, port = listeners[0].socket.getsockname()[:2]
    print(f"genie serve listening on {host}:{port}", flush=True)  # parents parse this line
    if config.verbose or not config.exit_on_stdin_eof:  # an embedded server stays quiet
        print(f"genie serve: device {server.device}, memory limit {config.memory_limit or 'none'}",
              file=sys.stderr, flush=True)
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
