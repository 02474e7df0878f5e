"""The composition root: registers the device and picks the default backend."""

from __future__ import annotations

from genie.lazy import SHAPES, install_module_hooks, register
from genie.runtime import Backend, backend, set_backend_factory


def _default_backend() -> Backend:
    import os

    if os.environ.get("GENIE_SERVER", "").strip() == "inprocess":  # debug: no server, no wire
        from genie.server import LocalBackend

        return LocalBackend("cpu")
    from genie.runtime._remote import backend_from_env  # GENIE_SERVER=host:port, or embedded

    return backend_from_env()


def setup() -> None:
    register()
    install_module_hooks()
    set_backend_factory(_default_backend)


def stats() -> dict:
    """Bytes sent/received, round trips, uploads skipped and plan-cache hits of this process."""
    d = backend().stats.as_dict()
    d["shape_cache_hits"] = SHAPES.hits
    d["shape_cache_misses"] = SHAPES.misses
    return d
