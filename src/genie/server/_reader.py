"""How a run message's ``graph`` field becomes a Graph, on one connection: a whole graph (perhaps
registered in a template slot), or a slot's template filled from corrections to its last two fills.
(The message's fields are type-checked by the protocol; what is checked here is what they mean.)

Call tree::

    RunReader(server).read(msg)          in a worker thread when big (``_heavy``), else on the loop
      _graph(msg)                        graph "bytes": _parse (bounded before the parse), _register
                                         graph "slot": _fill (``fix`` in the header, or two vectors)
      check_metas(graph)                 always: declared sizes, strides, offsets non-negative, bounded
      _schedule(msg, graph)              a stage schedule sent whole or named by its key (the digest
                                         of its content, computed here), checked against the graph
      check_sizes, predict_peak          under a memory limit: the run's predicted peak

A slot's state follows the order of the runs that fill it, so a connection decodes its runs one at a
time, in arrival order (``ConnectionHandler.work_loop``), even though they then compute at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import trio

from genie._errors import ProtocolError, RemoteProtocolError
from genie.graph import (
    CONST,
    Graph,
    StageSchedule,
    Template,
    apply,
    check_vetted,
    fix_lists,
    graph_from_bytes,
    predict,
    split,
)
from genie.server._memory import check_metas, check_sizes
from genie.server._memory import predict as predict_peak
from genie.server._residency import MissingScheduleError
from genie.server._tiers import mark_program
from genie.transport import Message

if TYPE_CHECKING:
    from genie.server._serve import Server

HEAVY_BYTES = 64 << 10  # a graph this big is decoded in a worker thread, off the event loop
HEAVY_FILLS = 1024  # ... and a template fill with this many corrections
# a run's graph, how many buffers described it, its stage schedule and layout, its predicted peak
Decoded = tuple[Graph, int, "StageSchedule | None", "list[list[int]] | None", int]


@dataclass
class RegisteredTemplate:
    """A template this connection's client registered in a slot, and the last two vectors that
    filled it (the client keeps the same pair: ``runtime``'s ``SentTemplate``)."""

    template: Template
    last: np.ndarray
    prev: np.ndarray
    strs: list[str]
    graph: Graph
    filled: bool = True  # filled once here: later fills rebuild only what changed (cheap)


class RunReader:
    """One connection's template slots, and the graphs its run messages name."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.slots: dict[int, RegisteredTemplate] = {}

    async def read(self, msg: Message) -> Decoded:
        """The run's graph, how many buffers described it, its stage schedule and layout, and its
        predicted peak (0 without a memory limit). A big graph or template fill is decoded in a worker
        thread, so the event loop keeps serving other connections meanwhile."""
        t0 = time.perf_counter()
        out = await trio.to_thread.run_sync(self._prepare, msg) if self._heavy(msg) else self._prepare(msg)
        self.server.stats["read_seconds"] += time.perf_counter() - t0
        return out

    def _heavy(self, msg: Message) -> bool:
        bufs = msg.buffers
        if msg["graph"] == "bytes":
            return bool(bufs) and isinstance(bufs[0], memoryview) and len(bufs[0]) > HEAVY_BYTES
        slot = self.slots.get(msg.get("slot"))
        return slot is None or not slot.filled or ("fix" not in msg.fields and bool(bufs)
                                                   and len(bufs[0]) > HEAVY_FILLS)

    def _prepare(self, msg: Message) -> Decoded:
        graph, n_graph = self._graph(msg)
        if self.server.config.ops != "all":  # --ops vetted: only the ops real models use (structural)
            graph.structural("vetted", lambda g: check_vetted(n.op for n in g.nodes))
        check_metas(graph)  # always: sizes decide the predicted peak and which runs go inline
        schedule, layout = self._schedule(msg, graph)
        pool = self.server.pool
        if pool.limit is None:
            return graph, n_graph, schedule, layout, 0
        check_sizes(graph)
        consts = {n.args[0]: pool.nbytes(n.args[0]) for n in graph.nodes if n.op == CONST}
        peak = predict_peak(graph, consts, inputs_held=not self.server.device.cuda).peak
        return graph, n_graph, schedule, layout, peak

    def _schedule(self, msg: Message, graph: Graph) -> tuple[StageSchedule | None, list[list[int]] | None]:
        """The run's stage schedule (sent whole and cached under its key, or named by key) and its
        checked layout on ``graph``."""
        stages = msg.get("stages")
        if stages is None:
            return None, None
        if isinstance(stages, str):
            schedule = self.server.schedules.get(stages)
            if schedule is None:
                raise MissingScheduleError(stages)
        else:
            schedule = StageSchedule.from_wire(stages)
        layout = schedule.check(graph)  # a cached schedule is checked too: another client may have sent it
        self.server.schedules[schedule.key] = schedule
        return schedule, layout

    def _graph(self, msg: Message) -> tuple[Graph, int]:
        """The graph a run names, and how many leading buffers described it."""
        form = msg["graph"]
        if form == "bytes":
            if not msg.buffers or not isinstance(msg.buffers[0], memoryview):
                raise RemoteProtocolError("run message: graph 'bytes' needs the graph bytes first")
            graph = _parse(msg.buffers[0], self.server.limits.max_nodes)
            if "slot" in msg.fields:
                self._register(msg, graph)
            return graph, 1
        if form == "slot":
            return self._fill(msg)
        raise RemoteProtocolError(f"run message: graph must be 'bytes' or 'slot', not {form!r:.40}")

    def _register(self, msg: Message, graph: Graph) -> None:
        slot, check = msg["slot"], msg.get("check")
        if not 0 <= slot < self.server.limits.max_slots or check is None:
            raise RemoteProtocolError("run message: bad slot registration")
        parts = split(graph)
        if parts is None or parts.digest != check:
            # the client derived another template from this graph: it must stop using the slot
            self.slots.pop(slot, None)
            raise ProtocolError("template mismatch: the client and server disagree on the graph")
        template = self.server.templates.get(parts.digest)
        if template is None:
            template = self.server.templates[parts.digest] = Template(parts.skeleton)
        graph.shared = template.shared
        mark_program(graph, template.digest, template.program_ints(parts.ints, graph))
        self.slots[slot] = RegisteredTemplate(template, parts.ints, parts.ints, parts.strs, graph,
                                              filled=False)

    def _fill(self, msg: Message) -> tuple[Graph, int]:
        """The graph of a slot run, and how many buffers carried its corrections: none when they
        came in the header (``fix``, a few ints), else two vectors."""
        slot = self.slots.get(msg.get("slot"))
        if slot is None or msg.get("check") != slot.template.digest:
            raise RemoteProtocolError("run message: unknown template slot, or its template differs")
        if "fix" in msg.fields:
            n_graph = 0
            idx_a, vals_a = fix_lists(msg["fix"], len(slot.last))
        else:
            n_graph = 2
            if len(msg.buffers) < 2:
                raise RemoteProtocolError("run message: graph 'slot' needs its corrections")
            idx, vals = msg.buffers[0], msg.buffers[1]
            if not (isinstance(idx, torch.Tensor) and idx.dtype == torch.int32 and idx.dim() == 1
                    and isinstance(vals, torch.Tensor) and vals.dtype == torch.int64
                    and vals.shape == idx.shape):
                raise RemoteProtocolError("run message: corrections must be int32 and int64 vectors")
            idx_a, vals_a = idx.numpy(), vals.numpy()
        ints = apply(predict(slot.last, slot.prev), idx_a, vals_a)
        strs = list(slot.strs)
        for pos, text in msg.get("strs", []):
            if not 0 <= pos < len(strs):
                raise RemoteProtocolError("run message: string correction out of range")
            strs[pos] = text
        if np.array_equal(ints, slot.last) and strs == slot.strs:
            graph = slot.graph
        else:
            graph = slot.template.fill(ints, strs)
            mark_program(graph, slot.template.digest, slot.template.program_ints(ints, graph))
        slot.prev, slot.last, slot.strs, slot.graph, slot.filled = slot.last, ints, strs, graph, True
        self.server.stats["template_hits"] += 1
        return graph, n_graph


def _parse(data: memoryview, max_nodes: int) -> Graph:
    """The graph in ``data``, refused past ``max_nodes`` before the expensive part: its JSON parse
    holds the GIL, so even in a worker thread it stalls the event loop for as long as it takes.
    Each node record is a JSON list of about 100-200 bytes, so the header's ``[`` bytes bound the
    node count from above and its length bounds the parse."""
    if len(data) >= 8:
        hlen = int.from_bytes(data[4:8], "little")
        brackets = bytes(data[8 : 8 + hlen]).count(b"[")
        if brackets > 16 * max_nodes or hlen > 256 * max_nodes:
            raise RemoteProtocolError(f"run message: a graph header of {hlen} bytes and {brackets} lists is "
                                      f"more than {max_nodes} nodes take (--max-nodes)")
    return graph_from_bytes(data, max_nodes=max_nodes)
