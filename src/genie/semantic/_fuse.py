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


def _contiguous(m: TensorMeta, order: Sequence[int] | None = None) -> TensorMeta:
    """``m`` laid out densely, innermost dimension last in ``order`` (default: row-major)."""
    order = range(len(m.shape)) if order is None else order
    stride, acc = [0] * len(m.shape), 1
    for d in reversed(order):
        stride[d] = acc
        acc *= max(m.shape[d], 1)
    return TensorMeta(m.shape, tuple(stride), m.dtype, 0)


# Fused convs run channels-last (NHWC): the kernel's fast layout. A chain of them then stays NHWC,
# since the elementwise ops between them keep their input's layout.
_CHANNELS_LAST = (0, 2, 3, 1)


def _fused_kwargs(c: FusedCall) -> dict[str, Any]:
    if c.op == "genie.conv2d_bn_act":
        return {**c.kwargs, "channels_last": True}
    return c.kwargs


def _fused_meta(c: FusedCall, m: TensorMeta) -> TensorMeta:
    if c.op == "genie.conv2d_bn_act" and len(m.shape) == 4:
        return _contiguous(m, _CHANNELS_LAST)
    return _contiguous(m)


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


def _removed(g: Graph, calls: Sequence[FusedCall]) -> set[int]:
    """Members other than roots, plus what only fed them (a causal mask's ``ones``/``tril``)."""
    member_of = {m for c in calls for m in c.members}
    removed = member_of - {c.root for c in calls}
    kept_alive = {r.node for c in calls for r in _refs_in((c.args, tuple(c.kwargs.values())))}
    outputs = {r.node for r in g.outputs}
    for n in reversed(g.nodes):
        users = g.users[n.id]
        if (n.id not in member_of and n.id not in kept_alive and n.id not in outputs and users
                and n.op != INPUT and not n.writes and all(u in removed for u in users)):
            removed.add(n.id)
    return removed


def fused_node(g: Graph, c: FusedCall, nid: int, module: str, fix) -> Node:
    """The node that runs ``c`` at id ``nid``, its Refs mapped by ``fix`` (source Ref -> new Ref)."""
    kwargs = _fused_kwargs(c)
    value = c.replaces[0] if c.replaces else Ref(c.root, 0)
    meta = _fused_meta(c, g.meta(value))
    storage = g.nodes[value.node].storages[value.index]
    return Node(nid, c.op, map_refs(c.args, fix), {k: map_refs(v, fix) for k, v in kwargs.items()}, (meta,),
                False, (storage,), (), c.module or module)


class _Rewrite:
    """The new node list being built, and where each source value went."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.ref_map: dict[Ref, Ref] = {}
        self.new_id = [-1] * len(g.nodes)
        self.nodes: list[Node] = []

    def fix(self, r: Ref) -> Ref:
        hit = self.ref_map.get(r)
        if hit is not None:
            return hit
        nid = self.new_id[r.node]
        assert nid >= 0, f"fuse: %{r.node} was removed but is still read"
        return Ref(nid, r.index)

    def copy(self, n: Node, **changes: Any) -> int:
        nid = self.new_id[n.id] = len(self.nodes)
        self.nodes.append(n.replace(**{"id": nid, "kwargs": dict(n.kwargs), **changes}))
        return nid

    def sources_of(self, args: tuple, kwargs: dict) -> None:
        """Sources first read here are placed right before their reader."""
        for r in _refs_in((args, tuple(kwargs.values()))):
            src = self.g.nodes[r.node]
            if src.op in SOURCE_OPS and self.new_id[src.id] < 0 and r not in self.ref_map:
                self.copy(src)

    def fused(self, n: Node, c: FusedCall) -> None:
        self.sources_of(c.args, _fused_kwargs(c))
        nid = self.new_id[n.id] = len(self.nodes)
        self.nodes.append(fused_node(self.g, c, nid, n.module, self.fix))
        for r in c.replaces or (Ref(n.id, 0),):
            self.ref_map[r] = Ref(nid, 0)

    def plain(self, n: Node) -> None:
        self.sources_of(n.args, n.kwargs)
        self.copy(n, args=map_refs(n.args, self.fix),
                  kwargs={k: map_refs(v, self.fix) for k, v in n.kwargs.items()})


def fuse(g: Graph, calls: Sequence[FusedCall]) -> tuple[Graph, list[int]]:
    """The rewritten graph and, for each source node id, its id there (-1 when it was removed)."""
    out, new_id, _ = fuse_mapped(g, calls)
    return out, new_id


def fuse_mapped(g: Graph, calls: Sequence[FusedCall]) -> tuple[Graph, list[int], dict[Ref, Ref]]:
    """``fuse``, plus where each value a fused node replaced went (source Ref -> new Ref).

    Sources (inputs, weights, residents) are also moved down to just before their first reader:
    moving a value with no dependencies later is always legal, and it makes each stage one
    contiguous run that binds its inputs only when it starts (the first stage does not wait for
    an input only the last one reads).
    """
    roots = {c.root: c for c in calls}
    removed = _removed(g, calls)
    rw = _Rewrite(g)
    for n in g.nodes:
        if n.id in removed or n.op in SOURCE_OPS:
            continue
        if n.id in roots:
            rw.fused(n, roots[n.id])
        else:
            rw.plain(n)
    outputs = {r.node for r in g.outputs}
    for n in g.nodes:  # sources nothing reads: inputs keep their position, outputs their value
        if n.op in SOURCE_OPS and rw.new_id[n.id] < 0 and (n.op == INPUT or n.id in outputs):
            rw.copy(n)
    used = {n.args[0] for n in rw.nodes if n.op == CONST}
    out = Graph(rw.nodes, [rw.fix(r) for r in g.outputs], {d: t for d, t in g.constants.items() if d in used})
    return out, rw.new_id, rw.ref_map
