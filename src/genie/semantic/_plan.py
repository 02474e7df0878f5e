"""The ExecutionPlan: what the runtime and server execute, as plain data.

Node ids in a plan refer to ``plan.graph`` (the graph after fusion); ``plan.node_map`` maps ids of
the captured graph to it. Stages are contiguous runs of ``plan.graph`` in program order, so running
stage 0, 1, ... in order is running the graph in order: every data and mutation edge is respected.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from genie.graph import SOURCE_OPS, Graph, Ref, StageSchedule, TensorMeta
from genie.semantic._match import operands
from genie.semantic._phase import Phase
from genie.semantic._workload import WorkloadType


class Residency(enum.Enum):
    WEIGHT = "weight: pinned on the remote, uploaded once by content digest"
    KV_CACHE = "kv cache: stays resident across steps"
    RESIDENT = "resident: already on the remote from an earlier run"
    INPUT = "input: uploaded, freed after its last use"
    ACTIVATION = "activation: freed after its last use"
    OUTPUT = "output: downloaded when its stage ends"

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class FusionGroup:
    kind: str  # the match kind: "attention", "conv_bn_act"
    op: str  # the fused op: "genie.attention", "genie.conv2d_bn_act"
    nodes: tuple[int, ...]  # member ids in the captured graph
    node: int  # the fused node's id in plan.graph
    module: str
    info: Mapping = field(default_factory=dict)


@dataclass(frozen=True)
class Transfer:
    direction: str  # "upload" | "download"
    node: int  # plan.graph id: the source node (upload) or the value's producer (download)
    what: str  # "input 0", "weight 3f2a..", "output 1"
    key: int | str  # input position, constant digest or output index
    nbytes: int
    stage: int  # upload: first stage that needs it; download: stage after which it is final
    pinned: bool = False  # weights: the server may already hold it (skip the bytes if so)


@dataclass(frozen=True)
class Stage:
    index: int
    name: str  # common module path of its nodes
    nodes: tuple[int, ...]  # plan.graph ids in program order (sources first used here included)
    needs: tuple[Ref, ...]  # values produced before this stage that it reads
    uploads: tuple[int, ...]  # input positions first read here: wait for these before starting
    weights: tuple[str, ...]  # constant digests first read here
    ready_outputs: tuple[int, ...]  # indices of graph.outputs final when this stage ends
    keep_outputs: tuple[int, ...]  # of those, the ones kept resident (KV cache), not downloaded
    frees: tuple[int, ...]  # values (node ids) dead once this stage ends
    fused: tuple[int, ...]  # fused node ids in this stage
    flops: int = 0
    bytes: int = 0

    @property
    def first(self) -> int:
        return self.nodes[0]

    @property
    def last(self) -> int:
        return self.nodes[-1]


@dataclass(frozen=True, eq=False)
class ExecutionPlan:
    key: str  # names the stage schedule (digest or structure + settings + output stages); servers key on it
    source_digest: str  # the captured graph's digest (the structure key, for a re-instantiated plan)
    graph: Graph  # what runs: the captured graph with fusion groups replaced
    node_map: tuple[int, ...]  # captured node id -> plan.graph id (-1: fused away or dead)
    workload: WorkloadType
    phase: Phase
    stages: tuple[Stage, ...]
    fusion_groups: tuple[FusionGroup, ...]
    unfused: tuple[tuple[str, int, str], ...]  # (kind, root in captured graph, why not fused)
    residency: Mapping[int, Residency]  # plan.graph id -> where its value lives
    uploads: tuple[Transfer, ...]  # in the order to send them: first use first
    downloads: tuple[Transfer, ...]  # in the order they become ready
    stage_of: tuple[int, ...]  # plan.graph id -> stage index
    last_use: Mapping[int, int]  # value node id -> node id of its last reader
    weight_bytes: int
    stream: tuple[int, ...] = ()  # input positions sent in their own frames after the run, in order

    @property
    def peak_bytes(self) -> int:
        """Activations alive at once, at most (static estimate; computed when first asked)."""
        return self._liveness[0]

    @property
    def activation_bytes(self) -> int:
        """All activations added up: what running without frees would hold."""
        return self._liveness[1]

    @cached_property
    def _liveness(self) -> tuple[int, int]:
        return _liveness(self.graph, self.residency)

    def stage_schedule(self) -> StageSchedule:
        """What an executor needs to run ``plan.graph`` in these stages (sent with a run)."""
        nodes = self.graph.nodes
        starts = [next((n for n in s.nodes if nodes[n].op not in SOURCE_OPS), None) for s in self.stages]
        ready = [0] * len(self.graph.outputs)
        for s in self.stages:
            for i in s.ready_outputs:
                ready[i] = s.index
        return StageSchedule(tuple(n for n in starts if n is not None), tuple(ready))

    def __str__(self) -> str:
        from genie.semantic._format import format_plan

        return format_plan(self)

    def __repr__(self) -> str:
        return (f"<ExecutionPlan {self.key[:12]} {self.workload}/{self.phase} {len(self.stages)} stages, "
                f"{len(self.fusion_groups)} fused>")


def _liveness(g: Graph, residency: dict[int, Residency]) -> tuple[int, int]:
    """(peak, total) bytes of activations when each storage is freed after its last reader."""
    size: dict[int, int] = {}
    owner: dict[int, int] = {}
    for n in g.nodes:
        for i, s in enumerate(n.storages):
            size[s] = max(size.get(s, 0), _extent(n.outputs[i]))
            owner.setdefault(s, n.id)
    kept = {g.nodes[r.node].storages[r.index] for r in g.outputs}
    counted = {s for s, nid in owner.items()
               if residency.get(nid) is Residency.ACTIVATION or residency.get(nid) is Residency.OUTPUT
               or (residency.get(nid) is Residency.KV_CACHE and g.nodes[nid].op not in SOURCE_OPS)}
    last: dict[int, int] = {}
    ops = operands(g)
    for n in g.nodes:
        for r in ops[n.id]:
            s = g.nodes[r.node].storages[r.index]
            last[s] = n.id
        for s in (*n.storages, *n.writes):
            last[s] = max(last.get(s, n.id), n.id)
    frees: dict[int, list[int]] = {}
    for s, nid in last.items():
        if s in counted and s not in kept:
            frees.setdefault(nid, []).append(s)
    alive, peak, seen = 0, 0, set()
    for n in g.nodes:
        for s in n.storages:
            if s in counted and s not in seen:
                seen.add(s)
                alive += size[s]
        peak = max(peak, alive)
        for s in frees.get(n.id, ()):
            alive -= size[s]
    return peak, sum(size[s] for s in counted)


def _extent(m: TensorMeta) -> int:
    if not m.shape or all(s > 0 for s in m.shape):
        span = 1 + sum((s - 1) * st for s, st in zip(m.shape, m.stride, strict=False)) if m.shape else 1
        return (m.offset + span) * m.dtype.itemsize
    return 0
