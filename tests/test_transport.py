"""The wire protocol on bytes alone: no sockets, no server."""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest
import torch

from genie import LocalProtocolError, RemoteProtocolError
from genie.transport import CLOSED, NEED_DATA, Message, Protocol, State
from genie.transport._protocol import ALIGN, MAGIC, MESSAGES, PREFIX, VERSION


def pair() -> tuple[Protocol, Protocol]:
    """A client and a server past the handshake."""
    c, s = Protocol("client"), Protocol("server")
    s.receive_data(c.send_bytes(Message("hello", {"version": VERSION, "token": "t"})))
    assert s.next_event().kind == "hello"
    c.receive_data(s.send_bytes(Message("welcome", {"version": VERSION, "device": "cpu",
                                                    "max_frame": 1 << 30})))
    assert c.next_event().kind == "welcome"
    assert c.state is s.state is State.READY
    return c, s


def feed_all(p: Protocol, data: bytes, chunk: int | None = None) -> list[Message]:
    out = []
    step = chunk or len(data) or 1
    for i in range(0, len(data), step):
        p.receive_data(data[i : i + step])
        while (ev := p.next_event()) is not NEED_DATA:
            out.append(ev)
    return out


def run_message(*buffers, **more) -> Message:
    return Message("run", {"id": 7, "graph": "bytes", "inputs": len(buffers) - 1, "consts": [],
                           "fetch": [0], "keep": [], **more}, list(buffers))


TENSORS = [
    torch.randn(3, 5),
    torch.arange(7, dtype=torch.int64),
    torch.tensor(True),
    torch.randn(2, 3).to(torch.bfloat16),
    torch.empty(0, 4),
    torch.randn(4, 6).t(),  # not contiguous: sent as its contiguous copy
    torch.tensor(2.5, dtype=torch.float64),
    torch.randint(0, 255, (5,), dtype=torch.uint8),
    torch.randn(3, dtype=torch.complex64),
]


def test_handshake_and_state_table():
    c, s = Protocol("client"), Protocol("server")
    assert c.state is State.START
    data = c.send_bytes(Message("hello", {"version": VERSION, "token": "secret"}))
    assert c.state is State.GREETED
    (hello,) = feed_all(s, data)
    assert hello.fields == {"version": VERSION, "token": "secret"}
    refusal = s.send_bytes(Message("error", {"id": 0, "kind": "auth", "message": "bad token"}))
    assert s.state is State.CLOSED
    (err,) = feed_all(c, refusal)
    assert err.kind == "error" and c.state is State.CLOSED


def test_round_trip_every_buffer_kind():
    c, s = pair()
    raw = b"graph bytes \x00\x01"
    data = c.send_bytes(run_message(raw, *TENSORS))
    (msg,) = feed_all(s, data)
    assert msg.kind == "run" and msg["id"] == 7 and msg.nbytes == len(data)
    assert bytes(msg.buffers[0]) == raw
    for sent, got in zip(TENSORS, msg.buffers[1:], strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert torch.equal(got, sent)


def test_buffers_are_aligned_views_of_one_payload():
    c, s = pair()
    (msg,) = feed_all(s, c.send_bytes(run_message(b"x", torch.ones(3, dtype=torch.float64),
                                                  torch.arange(12.0))))
    a, b = msg.buffers[1], msg.buffers[2]
    assert 0 < b.data_ptr() - a.data_ptr() < 256 and (b.data_ptr() - a.data_ptr()) % ALIGN == 0
    # each tensor's storage starts at its data: as_strided offsets mean what they mean locally
    assert b.storage_offset() == 0
    assert torch.equal(b.as_strided((2, 2), (1, 3), 1), torch.arange(12.0).as_strided((2, 2), (1, 3), 1))


@pytest.mark.parametrize("chunk", [1, 3, 17, 4096])
def test_partial_feeds(chunk):
    c, s = pair()
    msgs = [run_message(b"g", t) for t in TENSORS[:4]] + [Message("free", {"handles": [1, 2]})]
    data = b"".join(c.send_bytes(m) for m in msgs)
    got = feed_all(s, data, chunk)
    assert [m.kind for m in got] == ["run"] * 4 + ["free"]
    for m, t in zip(got, TENSORS[:4], strict=False):
        assert torch.equal(m.buffers[1], t)


def test_random_splits_many_messages():
    rng = random.Random(0)
    c, s = pair()
    msgs = [run_message(b"g" * rng.randrange(100), torch.randn(rng.randrange(1, 300)))
            for _ in range(30)]
    data = b"".join(c.send_bytes(m) for m in msgs)
    got, pos = [], 0
    while pos < len(data):
        n = rng.randrange(1, 2000)
        s.receive_data(data[pos : pos + n])
        pos += n
        while (ev := s.next_event()) is not NEED_DATA:
            got.append(ev)
    assert len(got) == 30
    for a, b in zip(msgs, got, strict=True):
        assert torch.equal(a.buffers[1], b.buffers[1])


def test_receive_into_the_payload_buffer():
    """The I/O layer can recv_into the payload: the protocol hands out the memory itself."""
    c, s = pair()
    big = torch.randn(1 << 16)
    data = c.send_bytes(run_message(b"g", big))
    head = PREFIX.size + struct.unpack_from("<I", data, 4)[0]
    s.receive_data(data[: head + 10])  # the header and a few payload bytes
    assert s.next_event() is NEED_DATA
    pos = head + 10
    while True:
        buf = s.receive_buffer()
        if buf is None:
            break
        n = min(len(buf), 1000, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        s.received_into(n)
        pos += n
    (msg,) = [s.next_event()]
    assert torch.equal(msg.buffers[1], big)


def test_eof_between_frames_is_closed_and_inside_a_frame_is_an_error():
    c, s = pair()
    s.receive_data(b"")
    assert s.next_event() is CLOSED
    c, s = pair()
    data = c.send_bytes(run_message(b"g", torch.randn(100)))
    s.receive_data(data[: len(data) // 2])
    assert s.next_event() is NEED_DATA
    s.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        s.next_event()


def frame(code: int, header: bytes, payload: bytes = b"", version: int = VERSION,
          magic: bytes = MAGIC) -> bytes:
    return PREFIX.pack(magic, version, code, len(header), len(payload)) + header + payload


def hdr(**fields) -> bytes:
    return json.dumps(fields).encode()


RUN = MESSAGES["run"].code
GOOD_RUN = dict(id=1, graph="bytes", inputs=0, consts=[], fetch=[], keep=[])
BAD_FRAMES = {
    "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad magic": frame(RUN, hdr(**GOOD_RUN, bufs=[]), magic=b"XX"),
    "bad version": frame(RUN, hdr(**GOOD_RUN, bufs=[]), version=99),
    "unknown code": frame(200, hdr(bufs=[])),
    "header not json": frame(RUN, b"{not json"),
    "header not an object": frame(RUN, b"[1, 2]"),
    "no buffer list": frame(RUN, hdr(**GOOD_RUN)),
    "missing field": frame(RUN, hdr(id=1, bufs=[])),
    "wrong field type": frame(RUN, hdr(**{**GOOD_RUN, "inputs": "3"}, bufs=[])),
    "bool is not int": frame(RUN, hdr(**{**GOOD_RUN, "id": True}, bufs=[])),
    "optional field of wrong type": frame(RUN, hdr(**GOOD_RUN, slot="0", bufs=[])),
    "list item of wrong type": frame(RUN, hdr(**GOOD_RUN, names=[1, 2.5], bufs=[])),
    "malformed corrections": frame(RUN, hdr(**GOOD_RUN, fix=[[1], [2], [3]], bufs=[])),
    "malformed string correction": frame(RUN, hdr(**GOOD_RUN, strs=[["0", "d"]], bufs=[])),
    "unknown dtype": frame(RUN, hdr(**GOOD_RUN, bufs=[["os.system", [1]]]), b"\0" * 8),
    "negative shape": frame(RUN, hdr(**GOOD_RUN, bufs=[["float32", [-1]]])),
    "sizes do not add up": frame(RUN, hdr(**GOOD_RUN, bufs=[["float32", [4]]]), b"\0" * 8),
    "server message from a client": frame(MESSAGES["result"].code,
                                          hdr(id=1, handles=[], metas=[], bufs=[])),
    "second hello": frame(MESSAGES["hello"].code, hdr(version=VERSION, token="", bufs=[])),
    "oversized payload": PREFIX.pack(MAGIC, VERSION, RUN, 10, 1 << 60),
    "oversized header": PREFIX.pack(MAGIC, VERSION, RUN, (1 << 32) - 1, 0),
    "deep nesting": frame(RUN, b"[" * 100_000 + b"]" * 100_000),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frames_raise_remote_protocol_error(name):
    _, s = pair()
    s.receive_data(BAD_FRAMES[name])
    with pytest.raises(RemoteProtocolError):
        s.next_event()


def test_before_hello_only_a_small_hello_is_accepted():
    s = Protocol("server")
    s.receive_data(frame(RUN, hdr(**GOOD_RUN, bufs=[])))
    with pytest.raises(RemoteProtocolError, match="may not send"):
        s.next_event()
    s = Protocol("server")  # an unauthenticated peer cannot make the server allocate
    s.receive_data(PREFIX.pack(MAGIC, VERSION, MESSAGES["hello"].code, 20, 1 << 20))
    with pytest.raises(RemoteProtocolError, match="too large"):
        s.next_event()


def test_no_payload_before_the_handshake():
    c = Protocol("client")
    with pytest.raises(LocalProtocolError, match="too large"):
        c.send(Message("hello", {"version": VERSION, "token": "x" * (1 << 17)}))
    assert c.state is State.START


def test_max_frame_is_enforced_on_receive():
    c, s = pair()
    s.max_frame = 1000
    s.receive_data(c.send_bytes(run_message(b"g", torch.zeros(2000, dtype=torch.uint8))))
    with pytest.raises(RemoteProtocolError, match="too large"):
        s.next_event()


def test_local_protocol_errors():
    c = Protocol("client")
    with pytest.raises(LocalProtocolError, match="may not send"):
        c.send(run_message(b"g"))  # before the handshake
    c, s = pair()
    with pytest.raises(LocalProtocolError, match="cannot send"):
        c.send(Message("result", {"id": 1, "handles": [], "metas": []}))
    with pytest.raises(LocalProtocolError, match="must be int"):
        c.send(Message("fetch", {"id": "1", "handle": 2}))
    with pytest.raises(LocalProtocolError, match="unknown message kind"):
        c.send(Message("exec", {}))
    with pytest.raises(LocalProtocolError, match="reserved"):
        c.send(Message("free", {"handles": [], "bufs": []}))
    with pytest.raises(LocalProtocolError, match="'handles' must be list of int"):
        c.send(Message("free", {"handles": [object()]}))
    with pytest.raises(LocalProtocolError, match="'names' must be list of int"):  # optional, declared
        c.send(run_message(b"g", names=[1, "2"]))
    with pytest.raises(LocalProtocolError, match="cannot be encoded"):  # undeclared: JSON's to refuse
        c.send(Message("free", {"handles": [], "note": object()}))
    assert c.state is State.READY  # a refused send changes nothing
    (msg,) = feed_all(s, c.send_bytes(run_message(b"g", torch.zeros(4))))
    assert msg.kind == "run"


def test_no_pickle_on_the_wire():
    c, _ = pair()
    data = c.send_bytes(run_message(b"g", torch.randn(3)))
    head = data[PREFIX.size : PREFIX.size + struct.unpack_from("<I", data, 4)[0]]
    json.loads(head)  # the header is JSON
    assert b"\x80\x04" not in head and b"\x80\x05" not in head


def test_receive_blocks_come_back_for_reuse_without_a_lock_in_the_finalizer():
    import gc

    from genie.transport import BufferPool

    pool = BufferPool(max_cached=64 << 20)
    first = pool.allocate(4 << 20)
    addr = np.frombuffer(first, np.uint8).ctypes.data
    del first
    gc.collect()
    assert pool.cached == 0  # returned, but filed only by the next allocate (no lock taken meanwhile)
    again = pool.allocate(4 << 20)
    assert np.frombuffer(again, np.uint8).ctypes.data == addr  # the same block, reused
    assert pool.cached == 0
