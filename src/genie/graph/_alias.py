"""What a graph writes, derived from op schemas alone: the server's own account of in-place writes.

The server never takes the client's ``Node.writes``/``Node.storages`` for this. Schemas say
``Tensor(a!) self`` for a write, ``Tensor(a) self -> Tensor(a)`` for a view and
``Tensor(a -> *) self -> Tensor(a)[]`` for split/unbind; out= arguments are writes like any other.
Values that may share memory fall into one class (union-find, in program order); a write to any
member writes every source (CONST, RESIDENT, INPUT) in its class. Over-approximating only costs a
copy; missing a write would let one client change another's weights.

A few aten kernels do more than their schemas say; those are tables here, shared with the client's
recorder so both sides agree:

- ``UNDECLARED_WRITES``: batch norm in training updates ``running_mean``/``running_var`` in place
  under a plain ``Tensor?`` (``native_batch_norm`` and the composites that reach it);
- ``UNDECLARED_ALIASES``: ``_unsafe_view`` returns a view under a plain ``Tensor``; ``set_`` makes
  ``self`` share ``source``'s memory.

Genie's fused ops (``genie.*``) write nothing and return fresh values.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any

from genie.graph._ir import CONST, RESIDENT, SOURCE_OPS, Graph, Node, Ref
from genie.graph._ops import resolve_op

# op name -> (argument positions written, (position, name) of the flag that turns the write on)
UNDECLARED_WRITES: dict[str, tuple[tuple[int, ...], tuple[int, str]]] = {
    "aten.native_batch_norm.default": ((3, 4), (5, "training")),
    "aten.native_batch_norm.out": ((3, 4), (5, "training")),
    "aten.cudnn_batch_norm.default": ((3, 4), (5, "training")),
    "aten.miopen_batch_norm.default": ((3, 4), (5, "training")),
    "aten.batch_norm.default": ((3, 4), (5, "training")),
    "aten._batch_norm_impl_index.default": ((3, 4), (5, "training")),
    "aten.instance_norm.default": ((3, 4), (5, "use_input_stats")),
}

# op name -> argument positions its outputs (and its ``self``) may share memory with, unsaid
UNDECLARED_ALIASES: dict[str, tuple[int, ...]] = {
    "aten._unsafe_view.default": (0,),
    "aten.set_.source_Tensor": (0, 1),
    "aten.set_.source_Tensor_storage_offset": (0, 1),
}


@cache
def _schema(op: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[tuple[int, ...], ...], bool]:
    """From ``op``'s schema: its argument names; the positions it writes; for each return, the
    positions it may alias; whether its one return is a list (then every output is that return)."""
    schema = resolve_op(op)._schema
    args = schema.arguments
    names = tuple(a.name for a in args)
    written = tuple(i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write)
    returns = []
    annotated = tuple(i for i, a in enumerate(args) if a.alias_info is not None)
    for r in schema.returns:
        if r.alias_info is None:
            returns.append(())
        elif not r.alias_info.before_set:  # ``Tensor(a)[]``: torch's binding hides the element's set
            returns.append(annotated)
        else:
            sets = set(r.alias_info.before_set)
            returns.append(tuple(i for i in annotated if sets & set(args[i].alias_info.before_set)))
    is_list = len(schema.returns) == 1 and str(schema.returns[0].type).startswith("List[")
    return names, written, tuple(returns), is_list


def _refs_at(node: Node, names: tuple[str, ...], positions: tuple[int, ...]) -> list[Ref]:
    """Every Ref passed to ``node`` at schema ``positions``, positionally or by keyword."""
    out: list[Ref] = []
    for p in positions:
        value = node.args[p] if p < len(node.args) else node.kwargs.get(names[p]) if p < len(names) else None
        out.extend(_refs(value))
    return out


def _refs(value: Any) -> Iterator[Ref]:
    if type(value) is Ref:
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _refs(v)


def undeclared_writes(node: Node) -> list[Ref]:
    """The values ``node`` writes without its schema saying so (batch norm's running stats)."""
    entry = UNDECLARED_WRITES.get(node.op)
    if entry is None:
        return []
    positions, (flag_pos, flag_name) = entry
    flag = node.args[flag_pos] if flag_pos < len(node.args) else node.kwargs.get(flag_name)
    if flag is False:
        return []
    return _refs_at(node, _schema(node.op)[0], positions)


class _Classes:
    """Union-find over values ``(node, index)``; each root carries the source nodes of its class.

    Every output of a list-returning node is one value here: a client cannot hide a view of a
    weight behind an output index its node's metadata does not list.
    """

    def __init__(self) -> None:
        self.parent: dict[tuple[int, int], tuple[int, int]] = {}
        self.sources: dict[tuple[int, int], set[int]] = {}
        self.lists: set[int] = set()

    def key(self, r: Ref) -> tuple[int, int]:
        return (r.node, 0) if r.node in self.lists else (r.node, r.index)

    def find(self, v: tuple[int, int]) -> tuple[int, int]:
        parent = self.parent
        root = v
        while root in parent:
            root = parent[root]
        while v != root:  # path compression
            parent[v], v = root, parent[v]
        return root

    def union(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        sa, sb = self.sources.pop(ra, None), self.sources.get(rb)
        self.parent[ra] = rb
        if sa:
            if sb is None:
                self.sources[rb] = sa
            else:
                sb |= sa

    def of(self, r: Ref) -> set[int]:
        return self.sources.get(self.find(self.key(r)), set())


def written_source_nodes(graph: Graph) -> set[int]:
    """Ids of the CONST/RESIDENT/INPUT nodes whose memory ``graph`` may write to."""
    classes = _Classes()
    written: set[int] = set()
    for n in graph.nodes:
        if n.op in SOURCE_OPS:
            classes.sources[(n.id, 0)] = {n.id}
            continue
        if n.op.startswith("genie."):
            continue
        names, writes, returns, is_list = _schema(n.op)
        for r in (*_refs_at(n, names, writes), *undeclared_writes(n)):
            written |= classes.of(r)
        if is_list:
            classes.lists.add(n.id)
        for i, positions in enumerate(returns):
            for r in _refs_at(n, names, positions):
                classes.union((n.id, i), classes.key(r))
        unsaid = UNDECLARED_ALIASES.get(n.op)
        if unsaid is not None:
            for r in _refs_at(n, names, unsaid):
                classes.union((n.id, 0), classes.key(r))
    return written


def written_sources(graph: Graph) -> tuple[list[str], bool]:
    """(digests of the constants ``graph`` writes to, whether it writes to a resident value),
    from the op schemas, whatever the nodes' own ``writes`` say."""
    consts: list[str] = []
    residents = False
    for nid in sorted(graph.structural("written_source_nodes", written_source_nodes)):
        n = graph.nodes[nid]
        if n.op == CONST:
            consts.append(n.args[0])
        elif n.op == RESIDENT:
            residents = True
    return list(dict.fromkeys(consts)), residents
