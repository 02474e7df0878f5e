"""The executor side: interpreter, stores, and (with the wire) ``genie serve``."""

from genie.server._interpreter import Interpreter
from genie.server._local import LocalBackend
from genie.server._session import Store

__all__ = ["Interpreter", "LocalBackend", "Store"]
