"""The executor side: interpreter, the one execution path, stores, and (with the wire) ``genie serve``."""

from genie.server._executor import InProcessExecutor, run_graph
from genie.server._front import run_server
from genie.server._interpreter import Interpreter
from genie.server._serve import Config, ConfigError
from genie.server._store import WeightStore

__all__ = ["Config", "ConfigError", "InProcessExecutor", "Interpreter", "WeightStore", "run_graph",
           "run_server"]
