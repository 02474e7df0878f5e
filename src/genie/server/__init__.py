"""The executor side: interpreter, the one execution path, stores, and (with the wire) ``genie serve``."""

from genie.server._interpreter import Interpreter
from genie.server._session import InProcessExecutor, execute

__all__ = ["InProcessExecutor", "Interpreter", "execute"]
