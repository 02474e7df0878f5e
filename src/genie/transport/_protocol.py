"""The Genie wire protocol: frames, the message table and the conversation state. No I/O here.

As in h11, a ``Protocol`` turns messages into bytes (``send``) and bytes into messages
(``receive_data`` / ``next_event``), and can be tested on bytes alone. For bulk payloads it also
hands out the memory the next bytes belong in (``receive_buffer`` / ``received_into``), so that the
I/O layer can ``recv_into`` straight into preallocated (pinned, on CUDA) tensors.

Frame (little endian)::

    b"GN" | u8 version | u8 kind code | u32 header length | u64 payload length      (16 bytes)
    header:  UTF-8 JSON object: the message's fields plus "bufs", one descriptor per buffer:
             [dtype, shape] for a tensor, ["bytes", n] for raw bytes
    payload: the buffers back to back, each starting at a multiple of 64 bytes (zero padding)

Messages (``MESSAGES``; every request carries an ``id`` that its reply repeats)::

    kind     sender  fields                                   buffers              reply
    hello    client  version, token                           -                    welcome | error
    welcome  server  version, device, max_frame (+ clock, pid) -
    has      client  id, digests                              -                    have
    have     server  id, missing                              -
    upload   client  id, digests                              one tensor each      done | error
    done     server  id                                       -
    run      client  id, graph, inputs, consts, fetch, keep   graph, inputs,       part* result | error
                     (+ frees, names, slot, check, fix, strs, consts
                      stages, stream, trace)
    input    client  id (of its run), input                   one tensor           (none)
    part     server  id, output (a fetch position)            one tensor
    result   server  id, handles, metas (+ early, timeline)   fetched tensors
    fetch    client  id, handle                               -                    result | error
    free     client  handles                                  -                    (none)
    stats    client  id                                       -                    report
    report   server  id, stats                                -
    ping     client  id                                       -                    pong
    pong     server  id                                       -
    cancel   client  id (of a run)                            -                    (none)
    weights  client  id, name (a checkpoint in the store)     -                    index | error
    index    server  id, tensors: [name, dtype, shape, digest] each   -
    error    server  id, kind, message (+ op, traceback,      -
                     missing, schedule); id 0: about the connection
                     (kinds: ``_errors.ERROR_KINDS``)

A run's ``graph`` says where its graph is: ``"bytes"``, the graph's wire form in the first buffer
(registered as template ``slot`` too when the run carries ``slot`` and the template's digest in
``check``), or ``"slot"``, that slot's template filled from corrections to its last two fills
(``fix``, a few [positions, values] in the header, or two vectors in the first two buffers; ``strs``
as [position, string] pairs).

A run may name its kept values: ``names`` holds one client-chosen handle per ``keep`` entry (ints
in (0, 2**53), distinct, not in use on the connection), so the client can read them in its next
run before this one's result arrives.

A run may stream its large inputs: ``stream`` lists input positions that follow it, each in its
own ``input`` frame, so the server starts the first stages before they have arrived. A run with
``stages`` (a StageSchedule, or the key of one sent before) runs stage by stage, and each fetched
output final before the last stage goes back at once as a ``part``; ``early`` in the result lists
the fetch positions so sent. ``trace`` asks for the server's ``timeline`` (``clock`` in welcome is
the server's perf_counter_ns, to line its times up with the client's). ``cancel`` stops a run at
its next node or stage boundary; that run then answers with an error of kind ``cancelled`` (or its
result, if it had already finished). A cancel for an id that is not running is ignored.

Conversation state (``TRANSITIONS``): START --hello--> GREETED --welcome--> READY; in GREETED an
error ends it (CLOSED). In READY each side may send its own kinds, in any number and order.
Each received frame is held to the limits of ``_limits.LIMITS`` (header bytes, descriptors, payload
bytes) before anything is allocated for it, and the payload is allocated by a callback that may refuse.
Before READY a frame may carry no payload and at most 64 KiB of header, so an unauthenticated peer
cannot make the server allocate.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch

from genie._errors import LocalProtocolError, RemoteMemoryError, RemoteProtocolError
from genie.transport._limits import LIMITS
from genie.transport._tensors import as_bytes, describe, from_bytes, parse_descriptor

VERSION = 2  # 2: a run's ``graph`` field (was ``plan``), declared optional fields
MAGIC = b"GN"
PREFIX = struct.Struct("<2sBBIQ")
ALIGN = 64
MAX_HEADER: int = LIMITS["max_header"].default  # type: ignore[assignment]
GREETING_MAX_HEADER: int = LIMITS["greeting_max_header"].default  # type: ignore[assignment]
DEFAULT_MAX_FRAME: int = LIMITS["max_frame"].default  # type: ignore[assignment]
MAX_BUFFERS: int = LIMITS["max_buffers"].default  # type: ignore[assignment]

CLIENT, SERVER = "client", "server"


class State(Enum):
    START = "start"
    GREETED = "greeted"
    READY = "ready"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ListOf:
    """A JSON list whose items are all ``item`` (a field type)."""

    item: FieldType


@dataclass(frozen=True, slots=True)
class Pair:
    """A JSON list of exactly two items, of these field types."""

    first: FieldType
    second: FieldType


FieldType = type | tuple | ListOf | Pair  # a tuple: any one of its types


def valid(v: Any, typ: FieldType) -> bool:
    """Whether the decoded JSON value ``v`` is of field type ``typ`` (an int is never a bool)."""
    if typ is int:
        return type(v) is int
    if isinstance(typ, ListOf):
        return type(v) is list and all(valid(x, typ.item) for x in v)
    if isinstance(typ, Pair):
        return type(v) is list and len(v) == 2 and valid(v[0], typ.first) and valid(v[1], typ.second)
    if isinstance(typ, tuple):
        return any(valid(v, t) for t in typ)
    return isinstance(v, typ)


def _type_name(typ: FieldType) -> str:
    if isinstance(typ, ListOf):
        return f"list of {_type_name(typ.item)}"
    if isinstance(typ, Pair):
        return f"[{_type_name(typ.first)}, {_type_name(typ.second)}]"
    if isinstance(typ, tuple):
        return " or ".join(_type_name(t) for t in typ)
    return typ.__name__


@dataclass(frozen=True, slots=True)
class Spec:
    """A message kind: its code, who sends it, the fields it must carry and those it may carry.
    Every field is type-checked here, once, as a frame is sent or received."""

    code: int
    sender: str
    fields: dict[str, FieldType]
    optional: dict[str, FieldType] = field(default_factory=dict)


_I, _S, _B, _L, _D = int, str, bool, list, dict
_INTS, _STRS = ListOf(int), ListOf(str)
MESSAGES: dict[str, Spec] = {
    "hello": Spec(1, CLIENT, {"version": _I, "token": _S}),
    "welcome": Spec(2, SERVER, {"version": _I, "device": _S, "max_frame": _I}, {"clock": _I, "pid": _I}),
    "has": Spec(3, CLIENT, {"id": _I, "digests": _STRS}),
    "have": Spec(4, SERVER, {"id": _I, "missing": _STRS}),
    "upload": Spec(5, CLIENT, {"id": _I, "digests": _STRS}),
    "done": Spec(6, SERVER, {"id": _I}),
    "run": Spec(7, CLIENT,
                {"id": _I, "graph": _S, "inputs": _I, "consts": _STRS, "fetch": _INTS, "keep": _INTS},
                {"frees": _INTS, "names": _INTS, "slot": _I, "check": _S, "fix": Pair(_INTS, _INTS),
                 "strs": ListOf(Pair(_I, _S)), "stages": (_S, _D), "stream": _INTS, "trace": _B}),
    "result": Spec(8, SERVER, {"id": _I, "handles": _INTS, "metas": _L}, {"early": _INTS, "timeline": _D}),
    "fetch": Spec(9, CLIENT, {"id": _I, "handle": _I}),
    "free": Spec(10, CLIENT, {"handles": _INTS}),
    "stats": Spec(11, CLIENT, {"id": _I}),
    "report": Spec(12, SERVER, {"id": _I, "stats": _D}),
    "ping": Spec(13, CLIENT, {"id": _I}),
    "pong": Spec(14, SERVER, {"id": _I}),
    "error": Spec(15, SERVER, {"id": _I, "kind": _S, "message": _S},
                  {"op": _S, "traceback": _S, "missing": _STRS, "schedule": _S}),
    "input": Spec(16, CLIENT, {"id": _I, "input": _I}),
    "part": Spec(17, SERVER, {"id": _I, "output": _I}),
    "cancel": Spec(18, CLIENT, {"id": _I}),
    "weights": Spec(19, CLIENT, {"id": _I, "name": _S}),
    "index": Spec(20, SERVER, {"id": _I, "tensors": _L}),
    # server to server (``genie.server._peers``): the client asks server i to lend kept values under
    # a one-shot token, then asks server j to pull them from i; i sends them to j as one ``value``
    "lend": Spec(21, CLIENT, {"id": _I, "handles": _INTS}),
    "lent": Spec(22, SERVER, {"id": _I, "token": _S, "nbytes": _I}),
    "pull": Spec(23, CLIENT, {"id": _I, "peer": _S, "token": _S, "names": _INTS, "dtypes": _STRS,
                              "shapes": ListOf(_INTS)}),
    "value": Spec(24, SERVER, {"id": _I}),
}
_BY_CODE = {s.code: k for k, s in MESSAGES.items()}
_READY_KINDS = {(s.sender, k) for k, s in MESSAGES.items() if k not in ("hello", "welcome")}

# state -> {(sender, kind): next state}; anything not listed breaks the protocol.
TRANSITIONS: dict[State, dict[tuple[str, str], State]] = {
    State.START: {(CLIENT, "hello"): State.GREETED},
    State.GREETED: {(SERVER, "welcome"): State.READY, (SERVER, "error"): State.CLOSED},
    State.READY: dict.fromkeys(_READY_KINDS, State.READY),
    State.CLOSED: {},
}


@dataclass(slots=True)
class Message:
    """One frame: ``kind``, its JSON ``fields`` and its ``buffers`` (CPU tensors or bytes)."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    buffers: list = field(default_factory=list)
    nbytes: int = 0  # size on the wire, set when sent or received
    started_ns: int = 0  # perf_counter_ns when its first bytes were read (set by the I/O layer)
    received_ns: int = 0  # ... and when its last bytes were
    refused: Exception | None = None  # the allocator refused its payload (skipped unread): see next_event

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")  # next_event(): feed more bytes
CLOSED = _Sentinel("CLOSED")  # next_event(): the peer closed cleanly, between frames

Allocator = Callable[[int], memoryview]  # a writable buffer of n bytes for one frame's payload


def _default_allocator(n: int) -> memoryview:
    return memoryview(np.empty(n, np.uint8))  # not zero-filled: pages are touched only when written


def _pad(n: int) -> int:
    return -n % ALIGN


def check_fields(kind: str, fields: dict, error: type[Exception]) -> None:
    """Raise ``error`` unless ``fields`` hold every field of ``kind`` and each field, optional ones
    included, has its declared type. Fields nobody declared are left alone (a newer peer's)."""
    spec = MESSAGES.get(kind)
    if spec is None:
        raise error(f"unknown message kind {kind!r:.40}")
    for name, typ in spec.fields.items():
        v = fields.get(name)
        if not valid(v, typ):
            raise error(f"{kind} message: field {name!r} must be {_type_name(typ)}, got {type(v).__name__}")
    for name, typ in spec.optional.items():
        if name in fields and not valid(fields[name], typ):
            raise error(f"{kind} message: field {name!r} must be {_type_name(typ)}, "
                        f"got {type(fields[name]).__name__}")


class Protocol:
    """One side (``role``) of one connection: state, framing and byte counts."""

    def __init__(self, role: str, *, max_frame: int = DEFAULT_MAX_FRAME, max_header: int = MAX_HEADER,
                 max_buffers: int = MAX_BUFFERS, allocate: Allocator = _default_allocator,
                 state: State = State.START) -> None:
        """``state``: where the conversation starts; GREETED on a server whose front process read the
        hello already (``genie serve`` hands a greeted connection to a worker process)."""
        if role not in (CLIENT, SERVER):
            raise ValueError(f"role must be {CLIENT!r} or {SERVER!r}")
        self.role = role
        self.peer = SERVER if role == CLIENT else CLIENT
        self.state = state
        self.max_frame = max_frame  # largest payload accepted from the peer
        self.max_header = max_header  # ... and header, once greeted (a JSON parse on the event loop)
        self.max_buffers = max_buffers  # ... and descriptors per frame (one tensor built per each)
        self.allocate = allocate
        self.bytes_sent = 0
        self.bytes_received = 0
        self._buf = bytearray()  # prefix and header bytes not parsed yet
        self._frame: tuple[str, dict, list, int, int] | None = None  # kind, fields, layout, sizes
        self._view: memoryview | None = None
        self._filled = 0
        self._eof = False
        self._skip = 0  # bytes of a refused payload still to drop
        self._scratch: memoryview | None = None  # where they are received, reused

    # -- state ----------------------------------------------------------------------------------
    def _advance(self, sender: str, kind: str, error: type[Exception]) -> None:
        nxt = TRANSITIONS[self.state].get((sender, kind))
        if nxt is None:
            raise error(f"{sender} may not send {kind!r} in state {self.state.value}")
        self.state = nxt

    def _limits(self) -> tuple[int, int]:
        if self.state in (State.START, State.GREETED):
            return GREETING_MAX_HEADER, 0
        return self.max_header, self.max_frame

    # -- sending --------------------------------------------------------------------------------
    def send(self, msg: Message) -> list[bytes | memoryview]:
        """The bytes of ``msg``, as a list to write in order (tensor data is not copied)."""
        if "bufs" in msg.fields:
            raise LocalProtocolError("'bufs' is reserved for the framing")
        check_fields(msg.kind, msg.fields, LocalProtocolError)
        if MESSAGES[msg.kind].sender != self.role:
            raise LocalProtocolError(f"a {self.role} cannot send {msg.kind!r}")
        if (self.role, msg.kind) not in TRANSITIONS[self.state]:
            raise LocalProtocolError(f"{self.role} may not send {msg.kind!r} in state {self.state.value}")
        # the payload limit is the receiver's to enforce (it knows its own max_frame); before the
        # handshake is done nothing but a small hello/welcome/error may be sent either way
        max_header, max_payload = self._limits()
        if self.state is State.READY:
            max_payload = 1 << 62
        descs, views = [], []
        for b in msg.buffers:
            if isinstance(b, torch.Tensor):
                descs.append(describe(b))
                views.append(as_bytes(b))
            else:
                mv = memoryview(b).cast("B")
                descs.append(["bytes", mv.nbytes])
                views.append(mv)
        out: list[bytes | memoryview] = []
        size = 0
        for mv in views:
            if size % ALIGN:
                out.append(bytes(_pad(size)))
                size += _pad(size)
            out.append(mv)
            size += mv.nbytes
        try:
            head = json.dumps({**msg.fields, "bufs": descs}, separators=(",", ":"),
                              allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise LocalProtocolError(f"{msg.kind} message cannot be encoded: {e}") from e
        if len(head) > max_header or size > max_payload:
            raise LocalProtocolError(f"{msg.kind} frame too large: header {len(head)} bytes, payload "
                                     f"{size} bytes (limits {max_header}, {max_payload})")
        self._advance(self.role, msg.kind, LocalProtocolError)
        prefix = PREFIX.pack(MAGIC, VERSION, MESSAGES[msg.kind].code, len(head), size)
        msg.nbytes = PREFIX.size + len(head) + size
        self.bytes_sent += msg.nbytes
        return [prefix + head, *out]

    def send_bytes(self, msg: Message) -> bytes:
        """``send`` joined into one bytes object (tests, small messages)."""
        return b"".join(bytes(b) for b in self.send(msg))

    # -- receiving ------------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        self.bytes_received += len(data)
        data = memoryview(data).cast("B")
        if self._skip:  # a refused payload: dropped as it comes
            n = min(len(data), self._skip)
            self._skip -= n
            data = data[n:]
            if not data:
                return
        if self._view is not None:  # inside a payload: straight into its buffer
            n = min(len(data), len(self._view) - self._filled)
            self._view[self._filled : self._filled + n] = data[:n]
            self._filled += n
            data = data[n:]
            if not data:
                return
            # bytes past this payload cannot be parsed before the payload is taken by next_event
        self._buf += data

    @property
    def between_frames(self) -> bool:
        """Nothing of a frame received yet: a reader may start on a new one here."""
        return self._frame is None and not self._buf and not self._skip

    def receive_buffer(self) -> memoryview | None:
        """Where the next payload bytes go (``recv_into`` it), or None: use ``receive_data``."""
        if self._skip and not self._buf:
            if self._scratch is None:
                self._scratch = memoryview(bytearray(256 << 10))
            return self._scratch[: self._skip]
        if self._view is None or self._filled == len(self._view) or self._buf:
            return None
        return self._view[self._filled :]

    def received_into(self, n: int) -> None:
        """``n`` bytes were written at the start of ``receive_buffer()``."""
        if n == 0:
            self._eof = True
            return
        self.bytes_received += n
        if self._skip:
            self._skip -= n
        else:
            self._filled += n

    def next_event(self) -> Message | _Sentinel:
        """The next complete message, NEED_DATA, or CLOSED. Broken bytes raise RemoteProtocolError.

        The allocator may refuse a payload by raising RemoteMemoryError: the message then comes at
        once, before its payload, with ``refused`` set and no buffers, and the payload is dropped as
        it arrives, so only that request fails."""
        if self._skip or (self._frame is None and not self._parse_header()):
            return self._need_data()
        kind, fields, layout, size, hlen = self._frame  # type: ignore[misc]
        if self._view is None:
            try:
                self._view = self.allocate(size).cast("B") if size else memoryview(bytearray())
            except RemoteMemoryError as e:
                take = min(len(self._buf), size)
                del self._buf[:take]
                self._frame, self._skip = None, size - take
                self._advance(self.peer, kind, RemoteProtocolError)
                return Message(kind, fields, [], PREFIX.size + hlen + size, refused=e)
            if len(self._view) != size or self._view.readonly:
                raise LocalProtocolError(f"the allocator gave {len(self._view)} bytes for {size}")
            self._filled = 0
            take = min(len(self._buf), size)
            self._view[:take] = self._buf[:take]
            self._filled = take
            del self._buf[:take]
        if self._filled < size:
            return self._need_data()
        buffers: list = []
        for off, n, d in layout:
            if d is not None:
                buffers.append(from_bytes(self._view, off, *d))
            else:
                buffers.append(self._view[off : off + n])
        self._frame, self._view = None, None
        msg = Message(kind, fields, buffers, PREFIX.size + hlen + size)
        self._advance(self.peer, kind, RemoteProtocolError)
        return msg

    def _need_data(self) -> _Sentinel:
        if self._eof:
            if self._frame is None and not self._buf and not self._skip:
                self.state = State.CLOSED
                return CLOSED
            raise RemoteProtocolError("the peer closed the connection in the middle of a frame")
        return NEED_DATA

    def _parse_header(self) -> bool:
        buf = self._buf
        if len(buf) < PREFIX.size:
            if len(buf) >= 2 and bytes(buf[:2]) != MAGIC:
                raise RemoteProtocolError("bad frame magic: not a genie peer, or the stream is corrupt")
            return False
        magic, version, code, hlen, plen = PREFIX.unpack_from(buf)
        if magic != MAGIC:
            raise RemoteProtocolError("bad frame magic: not a genie peer, or the stream is corrupt")
        if version != VERSION:
            raise RemoteProtocolError(f"peer speaks protocol version {version}, this side {VERSION}")
        kind = _BY_CODE.get(code)
        if kind is None:
            raise RemoteProtocolError(f"unknown message code {code}")
        max_header, max_payload = self._limits()
        if hlen > max_header or plen > max_payload:
            raise RemoteProtocolError(f"frame too large: header {hlen} bytes, payload {plen} bytes "
                                      f"(limits {max_header}, {max_payload}: --max-header, --max-frame)")
        if len(buf) < PREFIX.size + hlen:
            return False
        try:
            fields = json.loads(bytes(buf[PREFIX.size : PREFIX.size + hlen]))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise RemoteProtocolError(f"{kind} header is not JSON: {e}") from None
        if not isinstance(fields, dict):
            raise RemoteProtocolError(f"{kind} header is not a JSON object")
        descs = fields.pop("bufs", None)
        if not isinstance(descs, list):
            raise RemoteProtocolError(f"{kind} header has no buffer list")
        if len(descs) > self.max_buffers:  # before a descriptor is parsed or a tensor built
            raise RemoteProtocolError(f"{kind} frame with {len(descs)} buffers: at most {self.max_buffers} "
                                      "(--max-buffers)")
        check_fields(kind, fields, RemoteProtocolError)
        layout, size = [], 0
        for d in descs:
            size += _pad(size)
            if isinstance(d, list) and len(d) == 2 and d[0] == "bytes":
                n = d[1]
                if type(n) is not int or n < 0:
                    raise RemoteProtocolError(f"bad byte count {n!r:.40}")
                layout.append((size, n, None))
            else:
                dtype, shape, n = parse_descriptor(d)
                layout.append((size, n, (dtype, shape)))
            size += n
            if size > plen:
                break
        if size != plen:
            raise RemoteProtocolError(f"{kind} frame: buffers need {size} bytes, payload has {plen}")
        del buf[: PREFIX.size + hlen]
        self._frame = (kind, fields, layout, plen, hlen)
        return True
