"""The direct path of a blocking run: the caller's thread writes the frame and reads the reply.

``RemoteBackend.run`` (``.cpu()``, ``.item()``) blocks a user thread. Through the bridge, that costs
two thread hand-offs and two passes of the bridge's trio loop per round trip (in: wake the loop,
post; out: the reader parses, wakes the caller): about 100 us of a tiny op's round trip. Here,
when the loop sleeps with nothing in flight on the connection, the caller borrows it
(``Bridge.paused``: the loop runs nothing until the caller is done), builds the run as
``_start_run`` would, writes it on the socket itself, and reads the reply itself::

    run_direct(backend, ...)
      Bridge.paused()          the loop is in its I/O wait and stays there; else None: the usual path
      conn.direct_ready()      plain socket, nothing in flight or queued, no frame half read
      Session.post_run(send=post)   the run message, its frees on it, written here (post)
      wait(conn, waiter, BUDGET)    the reply read here (pongs and stale replies dropped as the
                                    reader would); past BUDGET the loop's reader takes it over
                                    (hand_over) and this thread waits as ``Bridge.call_back`` does
      Session.result(...)      in the paused block: the RunResult, or the server's error raised

The loop is never held for more than BUDGET while a slow run computes: other threads' work (and
the connection's watchdog) goes on through the loop meanwhile. KeyboardInterrupt while reading:
the reply is handed to the reader as abandoned (its values freed as it lands) and the server is
told to cancel the run, as ``Connection.abandon`` does. A broken link raises ConnectionLostError
here and closes the connection (``Connection.broken``); an evicted constant
(MissingOnServerError) returns None, and the usual path uploads it and runs again.

Nothing here calls into trio (this is not the loop's thread): the loop's tasks and callbacks, the
only other users of the connection and the session, are stopped while it runs.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from typing import TYPE_CHECKING

import outcome
import torch

from genie._errors import ConnectionLostError, LocalProtocolError
from genie.graph import Graph, StageSchedule
from genie.runtime._backend import RunResult
from genie.runtime._connection import Connection, Waiter
from genie.runtime._session import Session, constant_data
from genie.transport import CLOSED, NEED_DATA, Message, MissingOnServerError, error_from_message

if TYPE_CHECKING:
    from genie.runtime._remote import RemoteBackend

BUDGET = 0.002  # seconds a caller holds the paused loop waiting for its reply before handing it over
RECV_SIZE = 256 << 10  # a read's size when the protocol hands out no buffer


def run_direct(b: RemoteBackend, graph: Graph, inputs: list[torch.Tensor], fetch: list[int],
               keep: list[int], constants: dict[str, torch.Tensor], stages: StageSchedule | None,
               stream: list[int], trace: bool, names: list[int]) -> RunResult | None:
    """``b.run(...)`` on the direct path, or None when it cannot take it (nothing was sent then, or
    the server evicted a constant or a stage schedule: the usual path sends it and runs again).
    Staged runs go too (their early outputs are ``part`` messages); streamed inputs do not."""
    bridge, sess = b._bridge, b._session
    if stream or trace or bridge is None or sess is None or os.getpid() != b._pid:
        return None
    data = constant_data(graph, constants)
    conn = sess.conn
    with bridge.paused() as paused:
        if not paused or not conn.direct_ready() or not b._can_post_now(sess, data, None):
            return None
        sess.check_residents(graph)
        frees = b._take_frees(sess)
        written: list[bool] = []

        def post(msg: Message, orphan) -> Waiter:
            waiter = _post(conn, msg, orphan, frees)
            written.append(True)
            return waiter

        try:
            waiter = sess.post_run(graph, inputs, fetch, keep, data, stages, [], False, names, send=post)
        except BaseException:
            if not written and frees:  # a bad input, say: the frees wait for the next run
                sess.handles.update(frees)
                with b._frees_lock:
                    b._frees.extend(frees)
            raise
        extra = b.stats.extra  # runs written here, and those of them whose reply the loop read
        extra["direct_runs"] = extra.get("direct_runs", 0) + 1
        try:
            landed = waiter.error is not None or wait(conn, waiter, BUDGET)
        except BaseException:
            _abandon(conn, waiter)
            raise
        if landed:
            return _result(sess, graph, waiter, len(fetch), names)
        extra["direct_handed_over"] = extra.get("direct_handed_over", 0) + 1
        woken = threading.Lock()
        woken.acquire()
        box: list[outcome.Outcome] = []

        def settled() -> None:  # in the loop's reader, as the reply lands
            box.append(outcome.capture(_result, sess, graph, waiter, len(fetch), names))
            woken.release()

        waiter.notify = settled
        conn.hand_over(waiter)
    try:
        while not woken.acquire(timeout=1.0):
            if not bridge.alive:
                raise ConnectionLostError("genie's background loop has stopped")
    except BaseException:
        if not box:
            bridge.soon(conn.abandon, waiter)
        raise
    return box[0].unwrap()


def _result(sess: Session, graph: Graph, waiter: Waiter, n_fetch: int, names: list[int]) -> RunResult | None:
    try:
        return sess.result(graph, waiter, n_fetch, names)
    except MissingOnServerError as e:  # evicted under the memory limit meanwhile: the usual path
        sess.known.difference_update(e.digests)
        sess.schedules.discard(e.schedule or "")
        return None


def _post(conn: Connection, msg: Message, orphan, frees: list[int]) -> Waiter:
    """``Connection.post`` of a run, written here and now, ``frees`` on it."""
    if conn.closed or conn._gone:
        raise conn.error or ConnectionLostError("not connected")
    size = sum(t.numel() * t.element_size() if isinstance(t, torch.Tensor) else len(t) for t in msg.buffers)
    if size > conn.max_frame:
        raise LocalProtocolError(f"a {msg.kind} message of {size} bytes is more than the server "
                                 f"accepts ({conn.max_frame}): start it with a larger --max-frame")
    req_id = next(conn._ids)
    msg.fields["id"] = req_id
    waiter = Waiter(orphan)
    waiter.cancel_id = req_id
    queued = conn._frees
    if queued or frees:
        msg.fields["frees"], conn._frees = [*queued, *frees], []
    try:
        parts = conn.proto.send(msg)
    except LocalProtocolError as e:  # nothing was written: only this run fails, the frees wait
        msg.fields.pop("frees", None)
        conn._frees = [*queued, *frees, *conn._frees]
        waiter.error = e
        return waiter
    _write(conn, memoryview(b"".join(parts)))
    conn.stats.bytes_sent += msg.nbytes
    return waiter


def wait(conn: Connection, waiter: Waiter, budget: float) -> bool:
    """Read until ``waiter``'s reply is in (True), or for ``budget`` seconds at most (False).
    Other messages are what the reader makes of them with nothing else in flight: pongs and
    replies nobody waits for are dropped; a connection-level error closes the connection."""
    deadline = time.perf_counter() + budget
    raw, proto = conn._raw, conn.proto
    assert raw is not None
    while True:
        ev = proto.next_event()
        if ev is CLOSED:
            conn.broken(ConnectionLostError(f"the genie server at {conn.address} closed the connection"))
        if ev is not NEED_DATA:
            msg: Message = ev  # type: ignore[assignment]
            msg.received_ns = msg.started_ns = time.perf_counter_ns()
            conn.stats.bytes_received += msg.nbytes
            req_id = msg.get("id", 0)
            if msg.kind == "error" and req_id == 0:
                conn.broken(error_from_message(msg) if msg["kind"] == "protocol" else
                            ConnectionLostError(f"the genie server closed the connection: {msg['message']}"))
            if req_id == waiter.cancel_id:
                if msg.kind != "part":
                    waiter.reply = msg
                    return True
                waiter.parts[msg["output"]] = msg  # an early output: the result comes later
            continue
        buf = proto.receive_buffer()
        try:
            if buf is not None:
                proto.received_into(raw.recv_into(buf))
            else:
                proto.receive_data(raw.recv(RECV_SIZE))
            conn._last_io = time.perf_counter() + conn._clock
        except BlockingIOError:
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            _wait_for(conn, select.POLLIN, left)
        except OSError as e:
            conn.broken(ConnectionLostError(f"lost the genie server at {conn.address}: {e}"))


def _abandon(conn: Connection, waiter: Waiter) -> None:
    """This thread stopped waiting (KeyboardInterrupt): the reader drops the reply as it lands
    (a result's values let go), and the server is told to stop the run."""
    if waiter.reply is not None or waiter.error is not None:
        if waiter.reply is not None and waiter.reply.kind == "result" and waiter.orphan is not None:
            waiter.orphan(waiter.reply)
        return
    if conn.closed or conn._gone:
        return
    waiter.abandoned = True
    conn.hand_over(waiter)
    with contextlib.suppress(ConnectionLostError, LocalProtocolError):  # broken: the loop fails it
        _write(conn, memoryview(b"".join(conn.proto.send(Message("cancel", {"id": waiter.cancel_id})))))


def _write(conn: Connection, data: memoryview) -> None:
    raw = conn._raw
    assert raw is not None
    whole = len(data)
    try:
        while data:
            try:
                n = raw.send(data)
            except BlockingIOError:
                _wait_for(conn, select.POLLOUT, None)
                continue
            except OSError as e:
                conn.broken(ConnectionLostError(f"lost the genie server at {conn.address}: {e}"))
            data = data[n:]
    except BaseException:
        if 0 < len(data) < whole:  # (Ctrl-C) half a frame went out: the stream cannot go on
            with contextlib.suppress(ConnectionLostError):
                conn.broken(ConnectionLostError("a frame was cut short by an interrupt; the connection "
                                                "was closed"))
        raise
    conn._last_io = time.perf_counter() + conn._clock


def _wait_for(conn: Connection, event: int, timeout: float | None) -> None:
    poll = conn.poll
    if poll is None:
        poll = conn.poll = select.poll()
        poll.register(conn._raw, event)
    poll.modify(conn._raw, event)
    poll.poll(None if timeout is None else max(1, int(timeout * 1000)))
