"""One connection's server-side state as this process knows it, and how runs go out on it.

A ``Session`` is owned by ``RemoteBackend`` and touched only in its bridge loop: the constants the
server holds, the templates registered in its slots (``SentTemplate``), the stage schedules sent,
and the handles of values kept there, including those named by runs not yet answered (``makers``)
and those whose run failed (``failed``: whoever reads one later is told why).

Call tree (``RemoteBackend`` decides when; this builds what goes on the wire)::

    ensure_constants(data)   has -> upload what the server lacks (a progress bar past 64 MiB)
    post_run(...)            the run message, no checkpoint (template slot state follows post order):
      graph_fields(graph)      the whole graph, or its template's slot plus corrections
                               (``fix`` in the header when few, else two vectors)
      its stage schedule (whole the first time on this connection, then its key), inputs,
      constants the server may lack (inline when tiny); then each streamed input in its own frame
    result(...)              the reply as a RunResult (early ``part`` outputs in place, the server's
                             timeline on this clock)

Residency (``residency``, off in naive mode): constants go by content digest, uploaded only when
the server lacks them, and graphs by template slot. Without it every run re-sends every constant
and the whole graph.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import trio

from genie._errors import ConnectionLostError, GenieError, RemoteProtocolError, WeightsError
from genie.graph import (
    CONST,
    RESIDENT,
    SMALL_FIX,
    Graph,
    StageSchedule,
    corrections,
    decode_meta,
    predict,
    small_corrections,
    split,
)
from genie.runtime._backend import RunResult, Stats
from genie.runtime._connection import Connection, Waiter
from genie.transport import DTYPES, LIMITS, Message, error_from_message

MAX_SLOTS: int = LIMITS["max_slots"].default  # type: ignore[assignment]  # the server's, per connection
MAX_BUFFERS: int = LIMITS["max_buffers"].default  # type: ignore[assignment]  # per frame, by default
INLINE_MAX = 128  # constants this small ride along with the run instead of a has round trip
UPLOAD_FRAME = 64 << 20
PROGRESS_MIN = 64 << 20


@dataclass
class SentTemplate:
    """A template registered in the server's slot ``number``, and the last two vectors sent for it
    (the server keeps the same pair: ``server``'s ``RegisteredTemplate``)."""

    number: int
    last: np.ndarray
    prev: np.ndarray
    strs: list[str]
    registered_by: int = 0  # the run that registered it: if that run fails, the server may not have


@dataclass
class Session:
    conn: Connection
    stats: Stats
    residency: bool = True
    known: set[str] = field(default_factory=set)  # constant digests the server holds
    uploading: dict[str, trio.Event] = field(default_factory=dict)
    templates: OrderedDict[str, SentTemplate] = field(default_factory=OrderedDict)  # by template digest
    schedules: set[str] = field(default_factory=set)  # keys of the stage schedules the server was sent
    handles: set[int] = field(default_factory=set)  # live values this connection made (or will)
    failed: dict[int, BaseException] = field(default_factory=dict)  # handles whose run failed: why
    makers: dict[int, Waiter] = field(default_factory=dict)  # handle -> its run's waiter, till settled

    # -- handles ---------------------------------------------------------------------------------
    def run_failed(self, graph: Graph, waiter: Waiter, names: list[int], error: GenieError) -> None:
        """A run's reply is an error: its handles hold nothing; raise why a value it read was never
        made, if that is the cause."""
        self._forget_registration(waiter)
        self.handles.difference_update(names)
        for h in names:
            self.makers.pop(h, None)
        self.raise_cause(reads_of(graph), error)

    def raise_cause(self, handles: list[int], error: BaseException) -> None:
        """A request failed because a value it reads was never made: raise why that run failed."""
        for h in handles:
            failed = self.failed.get(h)
            if failed is not None:
                raise failed from error
            maker = self.makers.get(h)  # its reply is in, but its caller has not looked yet
            if maker is not None and maker.reply is not None and maker.reply.kind == "error":
                raise error_from_message(maker.reply) from error

    def check_residents(self, graph: Graph) -> None:
        for h in reads_of(graph):
            self.check_handle(h)

    def check_handle(self, h: int) -> None:
        if h in self.handles:
            return
        failed = self.failed.get(h)
        if failed is not None:  # the run that was to make it failed after its caller moved on
            raise failed
        raise ConnectionLostError("a tensor this program reads was kept on a genie server connection "
                                  "that has since been lost (or freed); compute it again")

    # -- constants -------------------------------------------------------------------------------
    def lacks_big_constants(self, data: dict[str, torch.Tensor]) -> bool:
        """Whether a run of ``data`` must first ask the server for constants (``ensure_constants``)."""
        return any(d not in self.known and _asked_for(t, self.residency) for d, t in data.items())

    async def ensure_constants(self, data: dict[str, torch.Tensor]) -> None:
        """Make sure the server holds every big constant: ask which it lacks, upload those."""
        big = [d for d, t in data.items() if d not in self.known and _asked_for(t, self.residency)]
        for d in big:
            ev = self.uploading.get(d)
            if ev is not None:  # another run of ours is sending it
                await ev.wait()
        mine = {d: trio.Event() for d in big if d not in self.known and d not in self.uploading}
        if not mine:
            return
        self.uploading.update(mine)
        try:
            reply = await self.conn.request(Message("has", {"digests": list(mine)}))
            missing = set(reply["missing"])
            self.known.update(d for d in mine if d not in missing)
            todo = [d for d in mine if d in missing]
            if todo:
                await self._upload([(d, wire_tensor(data[d])) for d in todo])
        finally:
            for d, ev in mine.items():
                self.uploading.pop(d, None)
                ev.set()

    async def _upload(self, items: list[tuple[str, torch.Tensor]]) -> None:
        conn = self.conn
        frame = min(UPLOAD_FRAME, conn.max_frame)
        for _, t in items:
            if _nbytes(t) > conn.max_frame - (64 << 10):
                raise NotImplementedError(
                    f"uploading one constant of {_nbytes(t)} bytes, more than the server's max frame "
                    f"({conn.max_frame}): chunked uploads are not implemented; start the server "
                    "with a larger --max-frame")
        bar = _progress_bar(sum(_nbytes(t) for _, t in items))
        batches: list[list[tuple[str, torch.Tensor]]] = [[]]
        size = 0
        for d, t in items:
            if batches[-1] and (size + _nbytes(t) > frame or len(batches[-1]) >= MAX_BUFFERS):
                batches.append([])
                size = 0
            batches[-1].append((d, t))
            size += _nbytes(t)
        try:
            waiters = [(batch, conn.post(
                Message("upload", {"digests": [d for d, _ in batch]}, [t for _, t in batch]),
                on_sent=bar.update if bar is not None else None)) for batch in batches]
            for batch, waiter in waiters:
                await conn.wait(waiter)  # type: ignore[arg-type]
                self.known.update(d for d, _ in batch)
                self.stats.uploads += len(batch)
                self.stats.extra["upload_bytes"] += sum(_nbytes(t) for _, t in batch)
        finally:
            if bar is not None:
                bar.close()

    # -- runs --------------------------------------------------------------------------------------
    def post_run(self, graph: Graph, inputs: list[torch.Tensor], fetch: list[int], keep: list[int],
                 data: dict[str, torch.Tensor], stages: StageSchedule | None, stream: list[int],
                 trace: bool, names: list[int],
                 send: Callable[[Message, Callable[[Message], None]], Waiter] | None = None) -> Waiter:
        """Build and queue the run message, then its streamed inputs. No checkpoint in here: slot
        state must follow post order, and the inputs must follow their run. ``send`` posts it
        instead of the connection's queue (the direct path: written from the caller's thread)."""
        inputs = [wire_tensor(t) for t in inputs]  # first: a bad input must leave no slot state
        stats = self.stats
        inline = [d for d in data if d not in self.known or (not self.residency and not data[d].is_meta)]
        self.known.update(inline)
        stats.uploads += len(inline)
        stats.uploads_skipped += len(data) - len(inline)
        stats.extra["upload_bytes"] += sum(_nbytes(data[d]) for d in inline)
        streamed = set(stream)
        if len(streamed) != len(stream) or not streamed <= set(range(len(inputs))):
            raise ValueError(f"stream must name distinct input positions, got {stream}")
        if stream and stages is None:
            raise ValueError("streamed inputs need a stage schedule")
        fields, graph_buffers = self.graph_fields(graph)
        if stages is not None:
            known = self.residency and stages.key in self.schedules
            fields["stages"] = stages.key if known else stages.to_wire()
            self.schedules.add(stages.key)
            if stream:
                fields["stream"] = stream
            if trace:
                fields["trace"] = True
        given = [t for p, t in enumerate(inputs) if p not in streamed]
        fields.update(inputs=len(given), consts=inline, fetch=fetch, keep=keep, names=names)
        buffers = [*graph_buffers, *given, *(wire_tensor(data[d]) for d in inline)]

        def orphan(reply: Message) -> None:  # a cancelled run's values
            self.handles.difference_update(names)
            self.conn.free_later(list(reply["handles"]))

        msg = Message("run", fields, buffers)
        waiter = self.conn.post(msg, orphan=orphan) if send is None else send(msg, orphan)
        self.handles.update(names)
        for h in names:
            self.makers[h] = waiter
        if fields["graph"] == "bytes" and "slot" in fields:
            self.templates[fields["check"]].registered_by = fields["id"]
        for p in stream:
            self.conn.post(Message("input", {"id": fields["id"], "input": p}, [inputs[p]]), reply=False)
        stats.extra["streamed_inputs"] += len(stream)
        return waiter

    def graph_fields(self, graph: Graph) -> tuple[dict, list]:
        """The run's ``graph`` field (and slot fields) and the buffers that carry it: the graph's
        bytes (registering its template in a slot the first time), or that slot plus corrections."""
        whole = lambda: [graph.to_bytes()]  # noqa: E731
        parts = split(graph) if self.residency else None
        if parts is None:
            return {"graph": "bytes"}, whole()
        sent = self.templates.get(parts.digest)
        if sent is None:
            number = self._slot_number()
            self.templates[parts.digest] = SentTemplate(number, parts.ints, parts.ints, parts.strs)
            return {"graph": "bytes", "slot": number, "check": parts.digest}, whole()
        self.templates.move_to_end(parts.digest)
        strs = [[i, s] for i, (s, old) in enumerate(zip(parts.strs, sent.strs, strict=True)) if s != old]
        fields = {"graph": "slot", "slot": sent.number, "check": parts.digest, "strs": strs}
        buffers: list = []
        if len(parts.ints) <= SMALL_FIX:  # a few ints: JSON in the header beats two tensors
            ints = parts.ints.tolist()
            fields["fix"] = list(small_corrections(ints, sent.last.tolist(), sent.prev.tolist()))
        else:
            idx, vals = corrections(parts.ints, predict(sent.last, sent.prev))
            if len(idx) <= SMALL_FIX:
                fields["fix"] = [idx.tolist(), vals.tolist()]
            else:
                buffers = [torch.from_numpy(idx), torch.from_numpy(vals)]
        sent.prev, sent.last, sent.strs = sent.last, parts.ints, parts.strs
        self.stats.template_hits += 1
        return fields, buffers

    def _slot_number(self) -> int:
        if len(self.templates) < MAX_SLOTS:  # the lowest free number (a failed registration frees one)
            used = {s.number for s in self.templates.values()}
            return next(n for n in range(MAX_SLOTS) if n not in used)
        _, oldest = self.templates.popitem(last=False)
        return oldest.number  # re-registering overwrites the server's slot

    def _forget_registration(self, waiter: Waiter) -> None:
        """A run failed: if it registered a template slot, the server may have refused the graph
        before registering it, so the slot is forgotten (the next run of that template registers it
        again)."""
        for digest, sent in list(self.templates.items()):
            if sent.registered_by == waiter.cancel_id:
                del self.templates[digest]

    def result(self, graph: Graph, waiter: Waiter, n_fetch: int, names: list[int],
               reply: Message | None = None) -> RunResult:
        """The RunResult of a run's reply (raised if it is an error); no checkpoint in here."""
        for h in names:
            self.makers.pop(h, None)
        if reply is None:
            try:
                reply = self.conn.outcome(waiter)
            except GenieError as e:
                self.run_failed(graph, waiter, names, e)
                raise
        handles, metas = reply["handles"], reply["metas"]
        early = reply.get("early", [])
        if (handles != names or len(metas) != len(names)
                or len(reply.buffers) != n_fetch - len(early) or set(early) != set(waiter.parts)):
            raise RemoteProtocolError("run result does not match what was asked")
        self.stats.runs += 1
        self.stats.extra["early_outputs"] += len(early)
        rest = iter(reply.buffers)
        fetched = [waiter.parts[p].buffers[0] if p in waiter.parts else next(rest) for p in range(n_fetch)]
        arrived = {p: m.received_ns for p, m in waiter.parts.items()}
        timeline = reply.get("timeline")
        if timeline is not None:
            timeline = {**_on_our_clock(timeline, self.conn.clock_offset), "pid": self.conn.server_pid}
        return RunResult(fetched, list(handles), [decode_meta(m) for m in metas], timeline, arrived)


def parse_weights_index(tensors: object) -> list[tuple[str, torch.dtype, tuple[int, ...], str]]:
    """A weights ``index`` reply's tensors, checked (the server's word, but a malformed one is a
    protocol error, not a crash later)."""
    out = []
    if isinstance(tensors, list):
        for entry in tensors:
            if not (isinstance(entry, list) and len(entry) == 4):
                break
            name, dtype, shape, digest = entry
            dt = DTYPES.get(dtype) if isinstance(dtype, str) else None
            if (not isinstance(name, str) or dt is None or not isinstance(digest, str)
                    or not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape)):
                break
            out.append((name, dt, tuple(shape), digest))
        else:
            return out
    raise RemoteProtocolError("a weights index must list [name, dtype, shape, digest] per tensor")


def reads_of(graph: Graph) -> list[int]:
    """The handles of the kept values ``graph`` reads."""
    return [n.args[0] for n in graph.nodes if n.op == RESIDENT]


def constant_data(graph: Graph, constants: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each constant the graph names (once, in first-use order) -> its data."""
    data = {}
    for n in graph.nodes:
        if n.op == CONST and n.args[0] not in data:
            d = n.args[0]
            t = constants.get(d, graph.constants.get(d))
            if t is None:
                raise GenieError(f"graph names constant {d} but no data for it was given")
            data[d] = t
    return data


def _asked_for(t: torch.Tensor, residency: bool) -> bool:
    """Whether a constant is asked for with ``has`` (and uploaded if missing) rather than sent inline:
    a big one, or one whose bytes only the server's weights store holds (a meta tensor here)."""
    return t.is_meta or (residency and _nbytes(t) > INLINE_MAX)


def wire_tensor(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_meta:  # bound by genie.remote_state_dict: this process never held its bytes
        raise WeightsError(f"a {str(t.dtype).removeprefix('torch.')}{list(t.shape)} weight comes from the "
                           "server's weights store, which no longer has it (did its file change, or "
                           "is this another server?): bind it again with genie.remote_state_dict")
    if t.device.type == "remote_accelerator":  # materializing it would block this very loop
        raise TypeError("a run's inputs must be host tensors, not remote_accelerator ones "
                        "(genie.execute brings those to the host itself)")
    return t if t.device.type == "cpu" else t.cpu()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _on_our_clock(timeline: dict, offset: int) -> dict:
    """The server's timeline with its perf_counter_ns times moved onto this process's clock."""
    def shift(rows: object, first: int) -> list:  # rows of [key..., time, time]: times from ``first``
        if not isinstance(rows, list):
            return []
        return [[*r[:first], *(t - offset for t in r[first:])] for r in rows
                if isinstance(r, list) and all(type(t) is int for t in r[first:])]

    return {**timeline, "stages": shift(timeline.get("stages"), 0), "waits": shift(timeline.get("waits"), 1),
            "outputs": shift(timeline.get("outputs"), 1), "receives": shift(timeline.get("receives"), 1),
            "sends": shift(timeline.get("sends"), 1)}


def _progress_bar(total: int):
    if total <= PROGRESS_MIN or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="genie upload",
                file=sys.stderr, leave=False)
