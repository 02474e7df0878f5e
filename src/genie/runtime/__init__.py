"""Runs graphs against a backend: in process, or a remote ``genie serve`` over trio."""

from genie.runtime._backend import Backend, RunResult, Stats, backend, set_backend, set_backend_factory
from genie.runtime._bridge import in_thread
from genie.runtime._execute import execute_graph, planned_for_flush, submit_graph
from genie.runtime._flush_replay import FLUSHES, flush_stats
from genie.runtime._local import Executor, LocalBackend, set_executor_factory
from genie.runtime._remote import RemoteBackend
from genie.runtime._servers import ServerSet, backend_from_env, connect

__all__ = ["FLUSHES", "Backend", "Executor", "LocalBackend", "RemoteBackend", "RunResult", "ServerSet",
           "Stats", "backend",
           "backend_from_env", "connect", "execute_graph", "flush_stats", "in_thread", "planned_for_flush",
           "set_backend", "set_backend_factory", "set_executor_factory", "submit_graph"]
