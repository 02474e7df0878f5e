"""The composition root: registers the device, picks the default backend, and gives the in-process
backend (runtime/) its executor (server/): the one place that may join the two."""

from __future__ import annotations

import torch

from genie._errors import GenieError
from genie.lazy import SHAPES, install_module_hooks, register
from genie.runtime import (
    Backend,
    Executor,
    LocalBackend,
    backend,
    flush_stats,
    set_backend_factory,
    set_executor_factory,
)

SERVING = "GENIE_SERVING"  # set in ``genie serve`` and inherited by its children (workers, compiles)


def _default_backend() -> Backend:
    import os

    if os.environ.get(SERVING):  # torch's fake tensors ask every device module ``is_available``:
        # here that must never start or reach a server (a server is nobody's client)
        raise GenieError("this process is a genie server: it has no remote_accelerator device of its own")
    if os.environ.get("GENIE_SERVER", "").strip() == "inprocess":  # debug: no server, no wire
        return LocalBackend("cpu")
    from genie.runtime import backend_from_env  # GENIE_SERVER=host:port, or embedded

    return backend_from_env()


def setup() -> None:
    register()
    install_module_hooks()
    set_backend_factory(_default_backend)
    set_executor_factory(_in_process_executor)


def _in_process_executor(device: torch.device) -> Executor:
    from genie.server import InProcessExecutor  # server code loads only when it runs in process

    return InProcessExecutor(device)


def stats(*, server: bool = False) -> dict:
    """This process's counters: bytes sent/received, round trips, uploads skipped, template hits,
    shape-cache hits. ``server=True`` adds the server's own (for this tenant: constants held, bytes
    loaded from its weights store, ...) under ``server.`` keys, at the cost of one round trip."""
    b = backend()
    d = b.stats.as_dict()
    d["shape_cache_hits"] = SHAPES.hits
    d["shape_cache_misses"] = SHAPES.misses
    d.update(flush_stats())  # device-mode flushes sent as replays of a remembered plan
    if server:
        ask = getattr(b, "server_stats", None)
        if ask is None:
            raise NotImplementedError("genie.stats(server=True): the in-process backend has no server")
        d.update({f"server.{k}": v for k, v in ask().items()})
    return d
