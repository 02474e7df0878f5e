"""One tenant's server state, and how ``genie serve`` is configured.

``Config`` is what ``genie serve``'s flags say. ``Server`` is one tenant's executor state, in that
tenant's worker process (``_workers``): the device, the constant pool (weights uploaded once, shared
by the tenant's connections), the template cache, the stage-schedule cache, the compute limiter, the
run-thread limiter and the open-connection count. Every limit is a row of ``transport.LIMITS``;
``Config.limits`` holds this server's values. The listening front process is ``_front``.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trio

from genie._errors import GenieError
from genie.graph import StageSchedule, Template
from genie.server._batch import BATCH_COUNTERS, MAX_BATCH, Batcher
from genie.server._device import Device
from genie.server._residency import ConstantPool
from genie.server._store import WeightStore
from genie.server._tiers import COMPILE_MIN_MS, Tiers, best_mode
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
    tokens_file: str | None = None  # --tokens: one tenant:token per line (re-read on SIGHUP)
    ops: str = "vetted"  # --ops: "vetted" (ops real models use, arguments checked) or "all" (trusted)
    weights: str | None = None  # --weights DIR: a read-only store of .safetensors files
    peers: frozenset[str] = frozenset()  # --peers: the only "host:port"s this server pulls values from
    compile: str | None = None  # --compile off|codegen|inductor: the highest tier (None: the best here)
    compile_cache: str | None = None  # --compile-cache DIR: compiled programs (None: default_compile_cache())
    max_batch: int = MAX_BATCH  # --max-batch: runs of one program run as one batch, at most (1: no batching)
    batch_wait: float = 0.0  # --batch-wait: seconds a batch waits for more runs before it starts


def default_compile_cache() -> str:
    """Where compiled programs persist: ``$XDG_CACHE_HOME/genie/compile`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "genie", "compile")


def compile_min_ms() -> float:
    """``$GENIE_COMPILE_MIN_MS``: programs faster than this at tier 1 are not compiled (default 1)."""
    try:
        return max(0.0, float(os.environ.get("GENIE_COMPILE_MIN_MS", COMPILE_MIN_MS)))
    except ValueError:
        return COMPILE_MIN_MS


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


def cuda_problem(config: Config) -> str | None:
    """Why ``config.device`` cannot be used here, or None (asked in the worker: CUDA is never touched
    in the front process, which forks)."""
    device = config.device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        return (f"--device {device}: this machine has no CUDA device that torch can use "
                "(torch.cuda.is_available() is False); use --device cpu")
    return None


class Server:
    """One tenant's executor state (in its worker process)."""

    def __init__(self, config: Config, tenant: str = "default") -> None:
        self.config = config
        self.tenant = tenant
        self.limits = lim = config.limits
        # --workers: programs computing at once, across connections (the per-device worker pool);
        # one on a GPU by default (each worker has a stream of its own), a few CPU threads otherwise
        cuda = (config.device or default_device()).startswith("cuda")
        workers = lim.workers or (1 if cuda else max(1, min(4, os.cpu_count() or 1)))
        self.device = Device(config.device or default_device(), streams=workers)
        self.pool = ConstantPool(lim.memory_limit)
        self.store = WeightStore(config.weights) if config.weights else None
        self.max_frame = lim.max_frame
        self.verbose = config.verbose
        self.templates: _LRU[str, Template] = _LRU(lim.max_templates)
        self.schedules: _LRU[str, StageSchedule] = _LRU(lim.max_templates)  # by content digest
        self.compute_limiter = trio.CapacityLimiter(workers)
        # a run holds a thread while it computes (a compute slot) or waits for a streamed input (its
        # slot lent out): at most --max-runs of those per connection, so stalled uploads can never
        # starve the others' runs of threads, nor the default limiter (decoding, digests)
        self.run_threads = trio.CapacityLimiter(lim.max_connections * lim.max_runs + workers)
        self.open_connections = 0
        self.memory_cap: int | None = None  # this worker's data-segment cap (``_workers.cap_memory``)
        self.stats: Counter[str] = Counter()
        cache = Path(config.compile_cache or default_compile_cache())
        self.tiers = Tiers(config.compile or best_mode(), cache, self.device.device, self.stats,
                           reserve=self.pool.run_reservation, min_ms=compile_min_ms())
        self.batcher = Batcher(self, config.max_batch, config.batch_wait) if config.max_batch > 1 else None
        for k in BATCH_COUNTERS:  # present from the start: a client reads them before any batch
            self.stats[k] += 0
        if self.device.cuda and lim.memory_limit:  # the caching allocator's own hard cap
            total = torch.cuda.get_device_properties(self.device.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, lim.memory_limit / total), self.device.device)

    def report(self) -> dict:
        p = self.pool
        # what ``torch.remote_accelerator``'s device functions answer (memory_allocated, ...)
        dev = self.device.device
        if self.device.cuda:
            props = torch.cuda.get_device_properties(dev)
            name, total = props.name, props.total_memory
            allocated, peak = torch.cuda.memory_allocated(dev), torch.cuda.max_memory_allocated(dev)
        else:  # no allocator statistics: the bytes held for this tenant, and this process's peak RSS
            import platform
            import resource

            name = f"CPU ({platform.machine()})"
            total = p.limit or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            allocated = p.used()
            peak = max(allocated, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return {**self.stats, "tenant": self.tenant, "device": str(self.device), "constants": len(p),
                "constant_bytes": p.const_bytes, "resident_bytes": p.resident_bytes,
                "evictions": p.evictions, "memory_limit": p.limit or 0, "templates": len(self.templates),
                "schedules": len(self.schedules), "open_connections": self.open_connections,
                "running_bytes": p.running, "frame_bytes": p.frame_bytes, "reply_bytes": p.reply_bytes,
                "memory_cap": self.memory_cap or 0, "pid": os.getpid(),
                "device_name": name, "total_memory": total, "memory_allocated": allocated,
                "max_memory_allocated": peak,
                "store_bytes_loaded": self.store.bytes_loaded if self.store else 0,
                "store_tensors_loaded": self.store.tensors_loaded if self.store else 0,
                "compile": self.tiers.mode, "tiers": self.tiers.report(),
                **(self.batcher.report() if self.batcher is not None else {"max_batch": 1})}


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
