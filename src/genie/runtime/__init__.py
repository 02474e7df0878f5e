"""Runs graphs against a backend: in process, or a remote ``genie serve`` over trio."""

from genie.runtime._backend import Backend, RunResult, Stats, backend, set_backend, set_backend_factory
from genie.runtime._execute import execute
from genie.runtime._local import Executor, LocalBackend, set_executor_factory

__all__ = ["Backend", "Executor", "LocalBackend", "RunResult", "Stats", "backend", "execute", "set_backend",
           "set_backend_factory", "set_executor_factory"]
