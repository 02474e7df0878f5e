"""One client connection: a receive task, a work task and a send task, joined by channels.

Call tree::

    Connection(server, sock).serve()
      handshake()                       hello -> token check -> welcome (or error + close)
      receive_loop()                    frames -> work queue, in order; ping answered at once;
                                        a run's streamed ``input`` frames go straight to its Inbound
      work_loop()                       one message at a time, in the order received:
        HANDLERS[kind](msg)               has, upload, run, fetch, free, stats
          run: plan (graph | slot) -> Graph; inline constants (digest checked); then, in a
               worker thread: stage inputs, compute, keep; results go to the send task
          run with stages: StagedInterpreter; a streamed input is waited for (the compute slot
               lent meanwhile) when its first reader's stage starts; each fetched output final
               before the end goes to the send task as a ``part`` when its stage ends
      send_loop()                       replies -> bytes -> socket
      finally: residents freed; a run still waiting for streamed inputs is failed

Work is ordered per connection (a free queued after a run must not overtake it) but runs in worker
threads, so a long compute never stops the event loop from serving other connections. A frame that
breaks the protocol closes this connection only; an error inside a run becomes an ``error`` reply.

Results are sent from the tensors themselves, without a copy. So a run that writes to a resident
value waits until no result is still being sent, and a run that writes to a constant (shared by
every client under its digest) writes to its own copy.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import math
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import trio

from genie._errors import (
    GenieError,
    ProtocolError,
    RemoteExecutionError,
    RemoteMemoryError,
    RemoteProtocolError,
    UnsupportedOpError,
)
from genie.graph import CONST, RESIDENT, SOURCE_OPS, Graph, StageSchedule
from genie.graph._template import Template, apply, predict, split
from genie.server._inbound import Inbound
from genie.server._job import Job, Lender, run_job, written_sources
from genie.server._residency import MissingConstantsError, MissingPlanError, Residents, content_digest
from genie.transport import CLOSED, NEED_DATA, SERVER, VERSION, Message, Protocol

if TYPE_CHECKING:
    from genie.server._serve import Server

_GONE = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
RECV_SIZE = 256 << 10
COALESCE = 64 << 10  # small parts of one frame go out in one send
MAX_SLOTS = 1024
INLINE_BYTES = 1 << 20  # a constant this small is checked and stored on the event loop


@dataclass
class Slot:
    """A template this connection's client registered, and the last two vectors that filled it."""

    template: Template
    last: np.ndarray
    prev: np.ndarray
    strs: list[str]
    graph: Graph


# (exception type, error kind): the first match names the kind of an ``error`` reply.
ERROR_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (MissingConstantsError, "missing"),
    (MissingPlanError, "missing"),
    (RemoteMemoryError, "memory"),
    (torch.OutOfMemoryError, "memory"),
    (UnsupportedOpError, "unsupported"),
    (ProtocolError, "protocol"),
    (Exception, "execution"),
)


def error_message(req_id: int, exc: BaseException) -> Message:
    kind = next(k for t, k in ERROR_KINDS if isinstance(exc, t))
    fields = {"id": req_id, "kind": kind, "message": str(exc), "op": "", "traceback": ""}
    if isinstance(exc, RemoteExecutionError):
        fields.update(message=exc.remote_message, op=exc.op, traceback=exc.remote_traceback)
    elif isinstance(exc, UnsupportedOpError):
        fields["op"] = exc.op
    elif isinstance(exc, MissingConstantsError):
        fields["missing"] = exc.digests
    elif isinstance(exc, MissingPlanError):
        fields.update(missing=[], plan=exc.key)
    elif kind in ("execution", "memory"):
        fields["message"] = f"{type(exc).__name__}: {exc}"
        fields["traceback"] = "".join(traceback.format_exception(exc))
    return Message("error", fields)


async def send_parts(sock: trio.socket.SocketType, parts: list) -> None:
    """Write one frame's parts: small ones joined into one send, big buffers sent in place."""
    small: list = []
    for p in parts:
        if len(p) < COALESCE:
            small.append(p)
            continue
        if small:
            await _send_all(sock, memoryview(b"".join(small)))
            small = []
        await _send_all(sock, memoryview(p).cast("B"))
    if small:
        await _send_all(sock, memoryview(b"".join(small)))


async def _send_all(sock: trio.socket.SocketType, mv: memoryview) -> None:
    while mv:
        n = await sock.send(mv)
        mv = mv[n:]


async def receive_message(sock: trio.socket.SocketType, proto: Protocol) -> Message | None:
    """The next message, or None when the peer closed cleanly; bulk payloads land by recv_into."""
    started = 0
    while True:
        ev = proto.next_event()
        if ev is CLOSED:
            return None
        if ev is not NEED_DATA:
            ev.received_ns = time.perf_counter_ns()  # type: ignore[union-attr]
            ev.started_ns = started or ev.received_ns  # type: ignore[union-attr]
            return ev  # type: ignore[return-value]
        buf = proto.receive_buffer()
        if buf is not None:
            proto.received_into(await sock.recv_into(buf))
        else:
            proto.receive_data(await sock.recv(RECV_SIZE))
        started = started or time.perf_counter_ns()


class Connection:
    def __init__(self, server: Server, sock: trio.socket.SocketType, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.proto = Protocol(SERVER, max_frame=server.max_frame, allocate=server.device.allocate)
        self.residents = Residents(server.pool)
        self.slots: dict[int, Slot] = {}
        self.outbox, self._outbox_recv = trio.open_memory_channel[Message](math.inf)
        self.work, self._work_recv = trio.open_memory_channel[Message](64)
        self.work_scope = trio.CancelScope()
        self._in_flight = 0  # result messages queued or being written
        self._sent = trio.Event()  # set (and replaced) each time that count drops to zero
        self.inbound: dict[int, Inbound] = {}  # run id -> its streamed inputs
        self._send_logs: dict[int, list] = {}  # traced run id -> [name, start, end] of its parts' sends
        self.greeted = False
        self.closing = False

    # -- lifetime -------------------------------------------------------------------------------
    async def serve(self) -> None:
        try:
            with trio.move_on_after(self.server.hello_timeout):
                if not await self.handshake():
                    return
            if not self.greeted:
                return
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._guard, self.send_loop)
                nursery.start_soon(self._guard, self.work_loop)
                nursery.start_soon(self._guard, self.receive_loop)
        except _GONE as e:
            self.log(f"connection lost: {e}")
        finally:
            self.residents.close()
            self.sock.close()

    async def _guard(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one of the three tasks; its end (or an I/O error) ends the connection."""
        try:
            await loop()
        except ProtocolError as e:
            self.fatal(e)
            return
        except _GONE as e:
            self.log(f"connection lost: {e}")
        self._nursery.cancel_scope.cancel()

    def fatal(self, exc: BaseException, req_id: int = 0) -> None:
        """The peer broke the protocol: stop working, say why, close within a bounded time."""
        if self.closing:
            return
        self.closing = True
        self.log(f"closing: {exc}")
        self.work_scope.cancel()
        self._abort_inbound(exc)
        with contextlib.suppress(trio.ClosedResourceError):
            self.outbox.send_nowait(error_message(req_id, exc))
            self.outbox.close()
        self._nursery.cancel_scope.deadline = trio.current_time() + 2

    def log(self, text: str) -> None:
        if self.server.verbose:
            print(f"genie serve: {self.peer}: {text}", file=sys.stderr, flush=True)

    async def handshake(self) -> bool:
        try:
            msg = await receive_message(self.sock, self.proto)
        except RemoteProtocolError as e:
            self.log(f"bad greeting: {e}")
            return False
        if msg is None:
            return False
        expected = self.server.token
        if msg["version"] != VERSION:
            reply = Message("error", {"id": 0, "kind": "protocol",
                                      "message": f"server speaks version {VERSION}, client {msg['version']}"})
        elif expected and not hmac.compare_digest(msg["token"].encode(), expected.encode()):
            reply = Message("error", {"id": 0, "kind": "auth", "message": "bad token"})
        else:
            reply = Message("welcome", {"version": VERSION, "device": str(self.server.device),
                                        "max_frame": self.server.max_frame, "clock": time.perf_counter_ns()})
        await send_parts(self.sock, self.proto.send(reply))
        if reply.kind == "error":
            self.log(reply["message"])
            return False
        self.server.stats["connections"] += 1
        self.greeted = True
        return True

    # -- the three tasks ------------------------------------------------------------------------
    async def receive_loop(self) -> None:
        try:
            while not self.closing:
                msg = await receive_message(self.sock, self.proto)
                if msg is None:
                    return  # the client closed: nobody is left to answer
                if msg.kind == "ping":
                    self.outbox.send_nowait(Message("pong", {"id": msg["id"]}))
                elif msg.kind == "input":
                    await self._on_input(msg)
                else:
                    if msg.kind == "run" and "stream" in msg.fields:
                        self._expect_inputs(msg)
                    await self.work.send(msg)
            await trio.sleep_forever()  # fatal(): the send task finishes the conversation
        finally:  # no more frames: a run waiting for a streamed input must not wait forever
            self._abort_inbound(GenieError("the connection ended before this run's streamed inputs "
                                           "arrived"))

    def _expect_inputs(self, msg: Message) -> None:
        req_id = msg["id"]
        if req_id in self.inbound:
            raise RemoteProtocolError(f"run {req_id}: a run with this id is still receiving inputs")
        self.inbound[req_id] = Inbound(_ints(msg["stream"], "stream"))

    async def _on_input(self, msg: Message) -> None:
        inbound = self.inbound.get(msg["id"])
        if inbound is None:
            raise RemoteProtocolError(f"input frame for run {msg['id']}, which streams no inputs")
        (t,) = _tensors(msg.buffers, 1, "input")
        if self.server.device.cuda:  # onto the device on the copy stream, beside running stages
            (t,) = await trio.to_thread.run_sync(self.server.device.stage, [t])
        inbound.arrive(msg["input"], t, msg.started_ns, msg.received_ns)
        self._settle(msg["id"])

    def _settle(self, req_id: int) -> None:
        inbound = self.inbound.get(req_id)
        if inbound is not None and inbound.run_done and inbound.complete:
            del self.inbound[req_id]

    def _abort_inbound(self, exc: BaseException) -> None:
        for inbound in self.inbound.values():
            inbound.abort(exc)

    async def send_loop(self) -> None:
        stats = self.server.stats
        async for msg in self._outbox_recv:
            if msg.kind in ("result", "error"):
                self._send_logs.pop(msg["id"], None)  # a traced result's timeline holds the list
            t0 = time.perf_counter_ns()
            await send_parts(self.sock, self.proto.send(msg))
            t1 = time.perf_counter_ns()
            stats["send_seconds"] += (t1 - t0) / 1e9
            if msg.kind == "part" and msg["id"] in self._send_logs:
                self._send_logs[msg["id"]].append([f"send output {msg['output']}", t0, t1])
            if msg.kind in ("result", "part") and msg.buffers:
                self._in_flight -= 1
                if not self._in_flight:
                    self._sent.set()
                    self._sent = trio.Event()
        # the outbox is closed only by fatal(): all is said, so returning ends the connection

    async def work_loop(self) -> None:
        with self.work_scope:
            async for msg in self._work_recv:
                req_id = msg.get("id", 0)
                try:
                    reply = await HANDLERS[msg.kind](self, msg)
                except ProtocolError as e:  # malformed content: answer, then close this connection
                    self.fatal(e, req_id)
                    break
                except Exception as e:
                    reply = error_message(req_id, e)
                if reply is not None and not self.closing:
                    if reply.kind == "result" and reply.buffers:
                        self._in_flight += 1  # fetched values may be residents: see on_run
                    self.outbox.send_nowait(reply)
        await trio.sleep_forever()  # fatal(): the send task finishes the conversation

    # -- handlers -------------------------------------------------------------------------------
    async def on_has(self, msg: Message) -> Message:
        digests = _strings(msg["digests"], "digests")
        return Message("have", {"id": msg["id"], "missing": self.server.pool.missing(digests)})

    async def on_upload(self, msg: Message) -> Message:
        digests = _strings(msg["digests"], "digests")
        tensors = _tensors(msg.buffers, len(digests), "upload")
        await self._store_constants(digests, tensors)
        return Message("done", {"id": msg["id"]})

    async def _store_constants(self, digests: list[str], tensors: list[torch.Tensor]) -> None:
        pool, device = self.server.pool, self.server.device
        for d, t in zip(digests, tensors, strict=True):
            if d in pool:
                continue
            if t.numel() * t.element_size() <= INLINE_BYTES and not device.cuda:
                self._put(d, t)  # a token id, a scalar: not worth a worker thread
            else:
                await trio.to_thread.run_sync(self._put, d, t)

    def _put(self, digest: str, t: torch.Tensor) -> None:
        if content_digest(t) != digest:  # else a client could shadow another's weights
            raise RemoteProtocolError(f"constant {digest[:16]}... does not have that content digest")
        self.server.pool.put(digest, t, self.server.device.to_device)
        self.server.stats["uploads"] += 1

    async def on_free(self, msg: Message) -> None:
        self.residents.free(_ints(msg["handles"], "handles"))

    async def on_stats(self, msg: Message) -> Message:
        return Message("report", {"id": msg["id"], "stats": self.server.report()})

    async def on_fetch(self, msg: Message) -> Message:
        t = self.residents.get(msg["handle"])
        if t is None:
            raise GenieError(f"handle {msg['handle']} is not resident on this connection")
        device = self.server.device
        host = await trio.to_thread.run_sync(device.to_host, [t]) if device.cuda else [t]
        return Message("result", {"id": msg["id"], "handles": [], "metas": []}, host)

    async def on_run(self, msg: Message) -> Message:
        inbound = self.inbound.get(msg["id"]) if "stream" in msg.fields else None
        try:
            return await self._run(msg, inbound)
        finally:
            if inbound is not None:
                inbound.run_done = True
                self._settle(msg["id"])

    async def _run(self, msg: Message, inbound: Inbound | None) -> Message:
        server = self.server
        if "frees" in msg.fields:
            self.residents.free(_ints(msg["frees"], "frees"))
        t0 = time.perf_counter()
        graph, n_plan = self._plan(msg)
        schedule, layout = self._schedule(msg, graph)
        server.stats["plan_seconds"] += time.perf_counter() - t0
        if inbound is not None and schedule is None:
            raise RemoteProtocolError("run message: streamed inputs need a stage schedule")
        n_in = msg["inputs"]
        digests = _strings(msg["consts"], "consts")
        bufs = msg.buffers[n_plan:]
        if len(bufs) != n_in + len(digests):
            raise RemoteProtocolError(f"run message: {len(bufs)} buffers for {n_in} inputs and "
                                      f"{len(digests)} constants")
        inputs: list[torch.Tensor | None] = list(_tensors(bufs[:n_in], n_in, "run"))
        if inbound is not None:  # streamed positions are holes, filled as their frames land
            total = n_in + len(inbound.positions)
            if any(p >= total for p in inbound.positions):
                raise RemoteProtocolError(f"run message: streamed input position out of range ({total} "
                                          "inputs)")
            given = iter(inputs)
            inputs = [None if p in inbound.positions else next(given) for p in range(total)]
        await self._store_constants(digests, _tensors(bufs[n_in:], len(digests), "run"))
        fetch, keep = _ints(msg["fetch"], "fetch"), _ints(msg["keep"], "keep")
        if any(not 0 <= i < len(graph.outputs) for i in (*fetch, *keep)):
            raise RemoteProtocolError("run message: fetch/keep index out of range")
        for n in graph.nodes:
            if n.op == RESIDENT and n.args[0] not in self.residents:
                raise GenieError(f"handle {n.args[0]} is not resident on this connection "
                                 "(freed, or kept by another connection)")
        device = server.device
        consts = [n.args[0] for n in graph.nodes if n.op == CONST]
        written, writes_residents = written_sources(graph)
        if writes_residents:  # a resident being sent must not change under the send
            while self._in_flight:
                await self._sent.wait()
        # on CUDA, staging and copying back run beside other connections' compute (copy stream);
        # on the CPU both are free, so one worker thread does the whole run
        if device.cuda:
            staged = iter(await trio.to_thread.run_sync(device.stage, [t for t in inputs if t is not None]))
            inputs = [None if t is None else next(staged) for t in inputs]
        job = Job(msg["id"], graph, inputs, consts, fetch, keep, written, schedule, layout, inbound,
                  bool(msg.get("trace")) and schedule is not None)
        if job.trace:
            job.send_log = self._send_logs[job.id] = []
            job.received = (msg.started_ns, msg.received_ns)
        run = functools.partial(run_job, job, server=server, residents=self.residents,
                                send_part=self._queue_part)
        if not device.cuda and schedule is None and all(n.op in SOURCE_OPS for n in graph.nodes):
            # nothing to compute (``.cpu()`` of a kept value, an echo): no worker thread needed
            out = run(lender=None)
        else:
            lender = Lender(server.compute_limiter)
            await lender.acquire()
            try:
                out = await trio.to_thread.run_sync(functools.partial(run, lender=lender))
            finally:
                lender.release()
        fetched = out.fetched
        if device.cuda:
            fetched = await trio.to_thread.run_sync(device.to_host, fetched)
        server.stats["runs"] += 1
        fields = {"id": msg["id"], "handles": out.handles, "metas": out.metas}
        if out.early:
            fields["early"] = out.early
        if out.timeline is not None:
            fields["timeline"] = out.timeline
        return Message("result", fields, fetched)

    def _schedule(self, msg: Message, graph: Graph) -> tuple[StageSchedule | None, list[list[int]] | None]:
        """The run's stage schedule (sent whole and cached under its plan key, or named by key) and
        its checked layout on ``graph``."""
        stages = msg.get("stages")
        if stages is None:
            return None, None
        if isinstance(stages, str):
            schedule = self.server.plans.get(stages)
            if schedule is None:
                raise MissingPlanError(stages)
        else:
            schedule = StageSchedule.from_wire(stages)
        layout = schedule.check(graph)  # a cached schedule is checked too: another client may have sent it
        self.server.plans[schedule.key] = schedule
        return schedule, layout

    def _queue_part(self, req_id: int, pos: int, host: torch.Tensor) -> None:
        if not self.closing:
            self._in_flight += 1
            self.outbox.send_nowait(Message("part", {"id": req_id, "output": pos}, [host]))

    def _plan(self, msg: Message) -> tuple[Graph, int]:
        """The graph a run names, and how many leading buffers described it."""
        plan = msg["plan"]
        if plan == "graph":
            if not msg.buffers or not isinstance(msg.buffers[0], memoryview):
                raise RemoteProtocolError("run message: plan 'graph' needs the graph bytes first")
            graph = Graph.from_bytes(msg.buffers[0])
            if "slot" in msg.fields:
                self._register(msg, graph)
            return graph, 1
        if plan == "slot":
            return self._fill(msg), 2
        raise RemoteProtocolError(f"run message: unknown plan {plan!r:.40}")

    def _register(self, msg: Message, graph: Graph) -> None:
        slot, check = msg["slot"], msg.get("check")
        if type(slot) is not int or not 0 <= slot < MAX_SLOTS or not isinstance(check, str):
            raise RemoteProtocolError("run message: bad slot registration")
        parts = split(graph)
        if parts is None or parts.digest != check:
            # the client derived another template from this graph: it must stop using the slot
            self.slots.pop(slot, None)
            raise ProtocolError("template mismatch: the client and server disagree on the graph")
        template = self.server.templates.get(parts.digest)
        if template is None:
            template = self.server.templates[parts.digest] = Template(parts.skeleton)
        self.slots[slot] = Slot(template, parts.ints, parts.ints, parts.strs, graph)

    def _fill(self, msg: Message) -> Graph:
        slot = self.slots.get(msg["slot"]) if type(msg.get("slot")) is int else None
        if slot is None or msg.get("check") != slot.template.digest:
            raise RemoteProtocolError("run message: unknown plan slot, or its template differs")
        if len(msg.buffers) < 2:
            raise RemoteProtocolError("run message: plan 'slot' needs its corrections")
        idx, vals = msg.buffers[0], msg.buffers[1]
        if not (isinstance(idx, torch.Tensor) and idx.dtype == torch.int32 and idx.dim() == 1
                and isinstance(vals, torch.Tensor) and vals.dtype == torch.int64
                and vals.shape == idx.shape):
            raise RemoteProtocolError("run message: corrections must be int32 and int64 vectors")
        ints = apply(predict(slot.last, slot.prev), idx.numpy(), vals.numpy())
        strs = list(slot.strs)
        for pair in msg.get("strs", []):
            if not (isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int
                    and 0 <= pair[0] < len(strs) and isinstance(pair[1], str)):
                raise RemoteProtocolError("run message: bad string correction")
            strs[pair[0]] = pair[1]
        if np.array_equal(ints, slot.last) and strs == slot.strs:
            graph = slot.graph
        else:
            graph = slot.template.fill(ints, strs)
        slot.prev, slot.last, slot.strs, slot.graph = slot.last, ints, strs, graph
        self.server.stats["plan_cache_hits"] += 1
        return graph


HANDLERS: dict[str, Callable[[Connection, Message], Awaitable[Message | None]]] = {
    "has": Connection.on_has,
    "upload": Connection.on_upload,
    "run": Connection.on_run,
    "fetch": Connection.on_fetch,
    "free": Connection.on_free,
    "stats": Connection.on_stats,
}


def _strings(v: list, what: str) -> list[str]:
    if not all(isinstance(x, str) for x in v):
        raise RemoteProtocolError(f"{what} must be strings")
    return v


def _ints(v: list, what: str) -> list[int]:
    if not all(type(x) is int for x in v):
        raise RemoteProtocolError(f"{what} must be ints")
    return v


def _tensors(bufs: list, n: int, what: str) -> list[torch.Tensor]:
    if len(bufs) != n or not all(isinstance(b, torch.Tensor) for b in bufs):
        raise RemoteProtocolError(f"{what} message: expected {n} tensors")
    return bufs
