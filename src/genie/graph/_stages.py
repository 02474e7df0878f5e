"""StageSchedule: the part of an ExecutionPlan an executor needs to run a graph in stages.

A stage is a contiguous run of the graph's compute nodes in program order; each source node (input,
constant, resident) joins the stage of its first reader. Running stage 0, 1, ... therefore keeps
program order among computations, and binds an input only when the first stage that reads it
starts: a streamed input may still be arriving while earlier stages compute. ``ready[i]`` is the
stage after which ``graph.outputs[i]`` is final (its last writer has run), so it can be sent back
then.

The scheduler (genie.semantic) makes one; the server checks one it receives against its graph.

A schedule's ``key`` is a digest of its content, computed by this same code on both sides. Executors
cache schedules under it (a run names a schedule sent before by its key), so a key can only ever name
one content: no client can make another client's key mean a different schedule. The ``key`` in a
received wire form is ignored: the receiver computes its own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property

from genie._errors import ProtocolError
from genie.graph._ir import SOURCE_OPS, Graph


@dataclass(frozen=True)
class StageSchedule:
    starts: tuple[int, ...]  # first compute node id of each stage, increasing
    ready: tuple[int, ...]  # per graph output: the stage after which it is final

    @cached_property
    def key(self) -> str:
        """The digest of this schedule's content: what executors cache it under."""
        body = json.dumps([list(self.starts), list(self.ready)], separators=(",", ":")).encode()
        return hashlib.blake2b(body, digest_size=16, person=b"genie-stages").hexdigest()

    def to_wire(self) -> dict:
        return {"key": self.key, "starts": list(self.starts), "ready": list(self.ready)}

    @classmethod
    def from_wire(cls, d: object) -> StageSchedule:
        """The schedule in ``d``. Its ``key`` is recomputed from the content, never taken as sent."""
        if not (isinstance(d, dict) and isinstance(d.get("key", ""), str)
                and all(isinstance(d.get(f), list) and all(type(x) is int for x in d[f])
                        for f in ("starts", "ready"))):
            raise ProtocolError("stage schedule must be {key: str, starts: [int], ready: [int]}")
        return cls(tuple(d["starts"]), tuple(d["ready"]))  # a sent key is the sender's word: unused

    @property
    def n_stages(self) -> int:
        return max(len(self.starts), 1)

    def check(self, graph: Graph) -> list[list[int]]:
        """Raise ProtocolError unless this schedule fits ``graph``; else return each stage's node ids
        in run order (what ``layout`` gives), so that a checked schedule is not laid out twice."""
        compute = [n.id for n in graph.nodes if n.op not in SOURCE_OPS]
        starts = self.starts
        if compute and (not starts or starts[0] != compute[0]):
            raise ProtocolError("stage schedule: the first stage must start at the first computation")
        if any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
            raise ProtocolError("stage schedule: stage starts must increase")
        ids = set(compute)
        if any(s not in ids for s in starts):
            raise ProtocolError("stage schedule: a stage starts at a node that is not a computation")
        if len(self.ready) != len(graph.outputs) or any(not 0 <= r < self.n_stages for r in self.ready):
            raise ProtocolError("stage schedule: one ready stage per graph output, each a stage index")
        stage_of, stages = graph.structural(("layout", tuple(starts)), self.layout)
        last_writer: dict[int, int] = {}
        for n in graph.nodes:
            for sid in n.writes:
                last_writer[sid] = n.id
        for i, r in enumerate(graph.outputs):
            storages = graph.nodes[r.node].storages
            final = max(r.node, last_writer.get(storages[r.index], -1) if storages else -1)
            if self.ready[i] < stage_of[final]:  # sent early, it would miss a later write
                raise ProtocolError(f"stage schedule: output {i} is ready before its last writer's stage")
        return stages

    def layout(self, graph: Graph) -> tuple[list[int], list[list[int]]]:
        """(stage of every node, node ids of each stage in run order): compute nodes by ``starts``,
        sources in the stage of their first reader (unread ones in the last)."""
        starts = set(self.starts)
        stage_of = [0] * len(graph.nodes)
        k = -1 if self.starts else 0
        first_reader: dict[int, int] = {}
        for n in graph.nodes:
            if n.op in SOURCE_OPS:
                continue
            if n.id in starts:
                k += 1
            stage_of[n.id] = k
            for r in n.refs():
                first_reader.setdefault(r.node, n.id)
        last = self.n_stages - 1
        for n in graph.nodes:
            if n.op in SOURCE_OPS:
                reader = first_reader.get(n.id)
                stage_of[n.id] = stage_of[reader] if reader is not None else last
        stages: list[list[int]] = [[] for _ in range(self.n_stages)]
        for nid, k in enumerate(stage_of):
            stages[k].append(nid)
        return stage_of, stages
