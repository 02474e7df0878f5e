"""Error kinds on the wire: the one table, its encoder (server) and its decoder (client).

An ``error`` message carries ``kind`` and ``message``, plus fields some kinds add::

    kind         raised on the client as          extra fields
    missing      MissingOnServerError             missing (digests), schedule (its key, or absent)
    memory       RemoteMemoryError                traceback
    unsupported  UnsupportedOpError               op
    weights      WeightsError                     -
    cancelled    RunCancelledError                -
    auth         AuthenticationError              -
    protocol     RemoteProtocolError              -
    execution    RemoteExecutionError             op, traceback

``id`` 0 is about the connection itself (a refused greeting, a broken frame), sent before it closes.
"""

from __future__ import annotations

import traceback

import torch

from genie._errors import (
    AuthenticationError,
    GenieError,
    ProtocolError,
    RemoteExecutionError,
    RemoteMemoryError,
    RemoteProtocolError,
    UnsupportedOpError,
    WeightsError,
)
from genie.transport._protocol import Message


class MissingOnServerError(GenieError):
    """The server lacks constants or a stage schedule a run named (never sent, or evicted since
    under its memory limit): nobody's fault; the client sends them again and retries."""

    def __init__(self, digests: list[str], schedule: str | None = None) -> None:
        self.digests = digests
        self.schedule = schedule  # the key of a stage schedule the server does not hold
        also = " and a stage schedule" if schedule else ""
        super().__init__(f"server lacks {len(digests)} constant(s){also}")


class RunCancelledError(GenieError):
    """The client cancelled this run (its caller stopped waiting): nobody's fault. The server stops
    it at the next node or stage boundary and answers with this, which the client discards."""


# (exception type, kind): the first row that matches names the kind of an ``error`` reply.
ERROR_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (MissingOnServerError, "missing"),
    (RemoteMemoryError, "memory"),
    (torch.OutOfMemoryError, "memory"),
    (MemoryError, "memory"),
    (UnsupportedOpError, "unsupported"),
    (WeightsError, "weights"),
    (RunCancelledError, "cancelled"),
    (AuthenticationError, "auth"),
    (ProtocolError, "protocol"),
    (Exception, "execution"),
)
KINDS = frozenset(k for _, k in ERROR_KINDS)


def error_message(req_id: int, exc: BaseException) -> Message:
    """The ``error`` reply to request ``req_id`` (0: the connection) that ``exc`` ended."""
    kind = next(k for t, k in ERROR_KINDS if isinstance(exc, t))
    fields = {"id": req_id, "kind": kind, "message": str(exc), "op": "", "traceback": ""}
    if isinstance(exc, RemoteExecutionError):
        fields.update(message=exc.remote_message, op=exc.op, traceback=exc.remote_traceback)
    elif isinstance(exc, UnsupportedOpError):
        fields["op"] = exc.op
    elif isinstance(exc, MissingOnServerError):
        fields["missing"] = exc.digests
        if exc.schedule is not None:
            fields["schedule"] = exc.schedule
    elif kind in ("execution", "memory"):
        fields["message"] = f"{type(exc).__name__}: {exc}"
        fields["traceback"] = "".join(traceback.format_exception(exc))
    return Message("error", fields)


def error_from_message(msg: Message) -> Exception:
    """The Genie exception an ``error`` message stands for (the server's word, not checked further:
    an unknown kind is the server breaking the protocol)."""
    kind, text = msg["kind"], msg["message"]
    op, tb = _str(msg.get("op")), _str(msg.get("traceback"))
    if kind == "execution":
        return RemoteExecutionError(text, op=op, remote_traceback=tb)
    if kind == "unsupported":
        return UnsupportedOpError(op or "?", text)
    if kind == "memory":
        return RemoteMemoryError(text)
    if kind == "missing":
        missing, schedule = msg.get("missing"), msg.get("schedule")
        digests = [d for d in missing if isinstance(d, str)] if isinstance(missing, list) else []
        return MissingOnServerError(digests, schedule if isinstance(schedule, str) else None)
    if kind == "weights":
        return WeightsError(text)
    if kind == "cancelled":
        return RunCancelledError(text)
    if kind == "auth":
        return AuthenticationError(f"the genie server refused the connection: {text}")
    if kind == "protocol":
        return RemoteProtocolError(f"the genie server reports a protocol error: {text}")
    return RemoteProtocolError(f"the genie server sent an error of unknown kind {kind!r:.40}: {text}")


def _str(v: object) -> str:
    return v if isinstance(v, str) else ""
