"""A pure rewrite: each fusion group becomes ONE node calling a fused op from genie.kernels.

The fused node sits where the group's root was and reads the group's inputs by Ref, so running the
new graph through the same interpreter computes the same values. Nodes that only fed the group
(a causal mask's ``ones``/``tril``/``where``) die with it and are dropped.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from genie.graph import CONST, INPUT, SOURCE_OPS, Graph, Node, Ref, TensorMeta, map_refs
from genie.semantic._match import operands


@dataclass(frozen=True)
class FusedCall:
    """One group to replace: ``op(*args, **kwargs)`` (Refs of the source graph) at ``root``."""

    kind: str
    op: str
    members: tuple[int, ...]
    root: int
    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)
    replaces: tuple[Ref, ...] = ()  # source values that become the fused node's output
    module: str = ""


def _contiguous(m: TensorMeta) -> TensorMeta:
    stride, acc = [], 1
    for s in reversed(m.shape):
        stride.append(acc)
        acc *= max(s, 1)
    return TensorMeta(m.shape, tuple(reversed(stride)), m.dtype, 0)


def _refs_in(value: Any) -> list[Ref]:
    out: list[Ref] = []
    if isinstance(value, dict):
        value = tuple(value.values())
    map_refs(value, lambda r: out.append(r) or r)
    return out


_WRITERS: weakref.WeakKeyDictionary[Graph, list[Node]] = weakref.WeakKeyDictionary()


def _writers(g: Graph) -> list[Node]:
    """The nodes that mutate something, once per graph (most graphs have none)."""
    w = _WRITERS.get(g)
    if w is None:
        w = _WRITERS[g] = [n for n in g.nodes if n.writes]
    return w


def why_not_fusable(g: Graph, call: FusedCall) -> str:
    """"" when replacing ``call.members`` by one node keeps every other value the same."""
    members = set(call.members)
    replaced = set(call.replaces)
    ops = operands(g)
    outputs = set(g.outputs)
    for m in call.members:
        node = g.nodes[m]
        if node.writes and m != call.root:
            return f"%{m} writes in place"
        for u in g.users[m]:
            if u in members:
                continue
            for r in ops[u]:
                if r.node != m:
                    continue
                if r not in replaced:
                    return f"%{m} is also read by %{u}, outside the group"
                if u < call.root:
                    return f"%{u} reads the group's value before the group ends"
        for i in range(len(node.outputs)):
            if Ref(m, i) in outputs and Ref(m, i) not in replaced:
                return f"%{m} is a graph output"
    storages = {s for m in call.members for s in g.nodes[m].storages} - \
        {g.nodes[r.node].storages[r.index] for r in replaced}
    inputs = {g.nodes[r.node].storages[r.index] for r in _refs_in((call.args, tuple(call.kwargs.values())))}
    first = min(call.members)
    for n in _writers(g):
        if n.id < first or n.id in members:
            continue
        if storages.intersection(n.writes):
            return f"%{n.id} writes memory the group uses"
        if n.id < call.root and inputs.intersection(n.writes):
            return f"%{n.id} changes an input while the group runs"
    return ""


def fuse(g: Graph, calls: Sequence[FusedCall]) -> tuple[Graph, list[int]]:
    """The rewritten graph and, for each source node id, its id there (-1 when it was removed).

    Sources (inputs, weights, residents) are also moved down to just before their first reader:
    moving a value with no dependencies later is always legal, and it makes each stage one
    contiguous run that binds its inputs only when it starts (the first stage does not wait for
    an input only the last one reads).
    """
    member_of = {m: i for i, c in enumerate(calls) for m in c.members}
    roots = {c.root: i for i, c in enumerate(calls)}
    removed = set(member_of) - set(roots)
    kept_alive = {r.node for c in calls for r in _refs_in((c.args, tuple(c.kwargs.values())))}
    outputs = {r.node for r in g.outputs}
    for n in reversed(g.nodes):  # what only fed the removed members dies with them
        users = g.users[n.id]
        if (n.id not in member_of and n.id not in kept_alive and n.id not in outputs and users
                and n.op != INPUT and not n.writes and all(u in removed for u in users)):
            removed.add(n.id)
    ref_map: dict[Ref, Ref] = {}
    new_id = [-1] * len(g.nodes)
    nodes: list[Node] = []

    def fix(r: Ref) -> Ref:
        hit = ref_map.get(r)
        if hit is not None:
            return hit
        nid = new_id[r.node]
        assert nid >= 0, f"fuse: %{r.node} was removed but is still read"
        return Ref(nid, r.index)

    def emit(n: Node, args: tuple, kwargs: dict) -> int:
        for r in _refs_in((args, tuple(kwargs.values()))):  # sources first read here come right before
            src = g.nodes[r.node]
            if src.op in SOURCE_OPS and new_id[src.id] < 0 and r not in ref_map:
                new_id[src.id] = len(nodes)
                nodes.append(Node(len(nodes), src.op, src.args, dict(src.kwargs), src.outputs, src.multi,
                                  src.storages, src.writes, src.module, src.seed))
        nid = len(nodes)
        new_id[n.id] = nid
        return nid

    for n in g.nodes:
        if n.id in removed or n.op in SOURCE_OPS:
            continue
        if n.id in roots:
            c = calls[roots[n.id]]
            nid = emit(n, c.args, c.kwargs)
            value = c.replaces[0] if c.replaces else Ref(n.id, 0)
            meta = _contiguous(g.meta(value))
            storage = g.nodes[value.node].storages[value.index]
            kwargs = {k: map_refs(v, fix) for k, v in c.kwargs.items()}
            nodes.append(Node(nid, c.op, map_refs(c.args, fix), kwargs, (meta,), False, (storage,), (),
                              c.module or n.module))
            for r in c.replaces or (Ref(n.id, 0),):
                ref_map[r] = Ref(nid, 0)
            continue
        nid = emit(n, n.args, n.kwargs)
        kwargs = {k: map_refs(v, fix) for k, v in n.kwargs.items()}
        nodes.append(Node(nid, n.op, map_refs(n.args, fix), kwargs, n.outputs, n.multi, n.storages, n.writes,
                          n.module, n.seed))
    for n in g.nodes:  # sources nothing reads: inputs keep their position, outputs their value
        if n.op in SOURCE_OPS and new_id[n.id] < 0 and (n.op == INPUT or n.id in outputs):
            new_id[n.id] = len(nodes)
            nodes.append(Node(len(nodes), n.op, n.args, dict(n.kwargs), n.outputs, n.multi, n.storages,
                              n.writes, n.module, n.seed))
    used = {n.args[0] for n in nodes if n.op == CONST}
    out = Graph(nodes, [fix(r) for r in g.outputs], {d: t for d, t in g.constants.items() if d in used})
    return out, new_id
