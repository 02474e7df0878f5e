"""The composition root: registers the device and picks the default backend."""

from __future__ import annotations

from genie.lazy import SHAPES, install_module_hooks, register
from genie.runtime import Backend, backend, set_backend_factory


def _default_backend() -> Backend:
    from genie.server import LocalBackend

    return LocalBackend("cpu")


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
