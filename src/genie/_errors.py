"""Every Genie exception. Each docstring says whose fault it is."""

from __future__ import annotations


class GenieError(Exception):
    """Base of every error Genie raises on purpose."""


class UnsupportedOpError(GenieError, NotImplementedError):
    """Your program used an op Genie cannot record or run remotely (the op is named).

    Genie only runs ops from ``torch.ops.aten``, ``torch.ops.prims`` and its own fused-op table.
    """

    def __init__(self, op: str, why: str = "") -> None:
        self.op = op
        super().__init__(f"genie cannot run op {op!r}" + (f": {why}" if why else ""))


class ProtocolError(GenieError):
    """Bytes that are not a valid Genie message or graph."""


class LocalProtocolError(ProtocolError):
    """This process tried to send something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol: its fault, or a broken link."""


class RemoteExecutionError(GenieError):
    """The program failed while the server ran it; usually your program's fault (shapes, dtypes).

    ``op`` is the failing op, ``remote_traceback`` the server's traceback text.
    """

    def __init__(self, message: str, *, op: str = "", remote_traceback: str = "") -> None:
        self.op = op
        self.remote_message = message
        self.remote_traceback = remote_traceback
        where = f" in {op}" if op else ""
        super().__init__(f"remote execution failed{where}: {message}")


class ConnectionLostError(GenieError):
    """The server went away or the link broke mid-call: the peer's fault, not your program's."""


class AuthenticationError(GenieError):
    """The server refused the token: the client's configuration is at fault."""


class CleartextTokenError(GenieError, ValueError):
    """This process was asked to send a token without TLS to a server on another machine, where
    anyone on the path could read it: the client's configuration is at fault (use TLS, or say
    ``insecure=True`` for a trusted network)."""


class RemoteMemoryError(GenieError):
    """The server cannot fit the data within its memory limit, even after evicting what it may."""


class WeightsError(GenieError):
    """A weights-store request was refused: the name is not a checkpoint in the server's store
    (``genie serve --weights DIR``), or the server has no store, or the file there lies about its
    contents. The message repeats the name asked for and says whose it is to fix."""
