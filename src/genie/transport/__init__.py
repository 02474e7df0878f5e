"""The wire protocol, pure: bytes in, messages out. No sockets (the I/O layers own those)."""

from genie.transport._buffers import BufferPool
from genie.transport._protocol import (
    CLIENT,
    CLOSED,
    DEFAULT_MAX_FRAME,
    MESSAGES,
    NEED_DATA,
    SERVER,
    TRANSITIONS,
    VERSION,
    Message,
    Protocol,
    State,
)
from genie.transport._tensors import DTYPES, as_bytes

__all__ = ["BufferPool", "CLIENT", "CLOSED", "DEFAULT_MAX_FRAME", "DTYPES", "MESSAGES", "NEED_DATA", "SERVER",
           "TRANSITIONS", "VERSION", "Message", "Protocol", "State", "as_bytes"]
