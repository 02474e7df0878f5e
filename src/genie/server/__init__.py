"""The executor side: interpreter, the one execution path, stores, and (with the wire) ``genie serve``."""

from genie.server._executor import InProcessExecutor, run_graph
from genie.server._front import run_server
from genie.server._interpreter import Interpreter
from genie.server._peers import parse_peers
from genie.server._serve import Config, ConfigError
from genie.server._store import WeightStore
from genie.server._tiers import MODES, TOLERANCE, Tiers, mark_program

__all__ = ["MODES", "TOLERANCE", "Config", "ConfigError", "InProcessExecutor", "Interpreter", "Tiers",
           "WeightStore", "mark_program", "parse_peers", "run_graph", "run_server"]
