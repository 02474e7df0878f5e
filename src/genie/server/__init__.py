"""The executor side: interpreter, the one execution path, stores, and (with the wire) ``genie serve``."""

from genie.server._executor import InProcessExecutor, run_graph
from genie.server._interpreter import Interpreter
from genie.server._serve import Config, ConfigError, run_server

__all__ = ["Config", "ConfigError", "InProcessExecutor", "Interpreter", "run_graph", "run_server"]
