"""The wire protocol, pure: bytes in, messages out (``_protocol``, ``_errors``). One small I/O helper
(``_io``) moves those bytes over a trio socket or TLS stream; nothing else here touches a socket."""

from genie.transport._buffers import BufferPool
from genie.transport._errors import (
    ERROR_KINDS,
    MissingOnServerError,
    RunCancelledError,
    error_from_message,
    error_message,
)
from genie.transport._io import (
    GONE,
    close_now,
    free_ports,
    receive_message,
    send_now,
    send_parts,
    writable_now,
)
from genie.transport._limits import LIMITS, Limit, Limits
from genie.transport._protocol import (
    CLIENT,
    CLOSED,
    DEFAULT_MAX_FRAME,
    MESSAGES,
    NEED_DATA,
    PREFIX,
    SERVER,
    TRANSITIONS,
    VERSION,
    Message,
    Protocol,
    State,
)
from genie.transport._tensors import DTYPES, as_bytes

__all__ = ["BufferPool", "CLIENT", "CLOSED", "DEFAULT_MAX_FRAME", "DTYPES", "ERROR_KINDS", "GONE", "LIMITS",
           "MESSAGES", "Limit", "Limits", "NEED_DATA", "PREFIX", "SERVER", "TRANSITIONS", "VERSION",
           "Message", "MissingOnServerError", "Protocol", "RunCancelledError", "State", "as_bytes",
           "close_now", "error_from_message", "error_message", "free_ports", "receive_message", "send_now",
           "send_parts", "writable_now"]
