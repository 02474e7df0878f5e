"""Structural patterns over the Graph, tinygrad-``UPat`` style: a pattern is data, matching is one
small backtracking function.

A ``Pat`` describes a value by the op that makes it and the patterns of that op's tensor operands
(the Refs in its args, flattened in order). Matching starts at a root node and walks *back* along
operands. Names bind values (``Ref``); a name used twice must bind the same value, which is how a
pattern says "the same x feeds both branches".

- ``through``: ops that may sit on top of the value, each with exactly one tensor operand (views,
  ``expand``, a multiply by a Python scalar). They are skipped, deepest candidate first, and join
  the match: ``q`` of ``view(expand(mul(q, 0.5)))`` is the tensor before the scale.
- ``opt``: the node may be absent; then ``src[0]`` is matched in its place.
- ``alts``: alternatives, first match wins (with backtracking into later ones).

A node matched by a structural pattern (``ops`` or ``src`` given) is a *member* of the match; a
leaf (no ``ops``, no ``src``) and any source node is an *input* to it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from genie.graph import SOURCE_OPS, Graph, Node, Ref
from genie.semantic._opsets import ops

Where = Callable[[Graph, Node, Ref], bool]
Bindings = dict[str, Ref]


@dataclass(frozen=True, eq=False)
class Pat:
    ops: frozenset[str] | str | Iterable[str] | None = None  # None: any op
    src: tuple[Pat | None, ...] | None = None  # operand patterns, a prefix of the node's Refs
    name: str | None = None
    through: frozenset[str] | Iterable[str] = frozenset()
    opt: bool = False
    commutative: bool = False  # two leading operands in either order
    where: Where | None = None
    alts: tuple[Pat, ...] = ()
    out: int | None = None  # which output of a multi-output node the value must be

    def __post_init__(self) -> None:
        # op names may be given bare ("mul.Tensor") or as one string: both become aten names
        if self.ops is not None:
            object.__setattr__(self, "ops", _names(self.ops))
        object.__setattr__(self, "through", _names(self.through))
        if self.src is not None and not isinstance(self.src, tuple):
            object.__setattr__(self, "src", tuple(self.src))
        if self.opt and not self.src:
            raise ValueError("Pat(opt=True) needs src: the node to match when this one is absent")

    # -- builders ---------------------------------------------------------------------------------
    @staticmethod
    def any(*alts: Pat, name: str | None = None) -> Pat:
        """The first of ``alts`` that matches."""
        return Pat(alts=alts, name=name)

    @staticmethod
    def seq(*ops: str | frozenset[str], name: str | None = None) -> Pat:
        """A chain: each op reads the previous one (as either of its first two operands)."""
        p: Pat | None = None
        for op in ops:
            p = Pat(op, src=None if p is None else (p,), commutative=p is not None)
        assert p is not None, "Pat.seq needs at least one op"
        return Pat(p.ops, src=p.src, commutative=p.commutative, name=name)

    def root_ops(self) -> frozenset[str] | None:
        """Ops a root node may have for this pattern to match there (None: any)."""
        if self.alts:
            out: set[str] = set()
            for a in self.alts:
                r = a.root_ops()
                if r is None:
                    return None
                out |= r
            return frozenset(out)
        if self.ops is None:
            return None
        ops = set(self.ops) | set(self.through)
        if self.opt and self.src and self.src[0] is not None:
            inner = self.src[0].root_ops()
            if inner is None:
                return None
            ops |= inner
        return frozenset(ops)


def _names(names: str | Iterable[str]) -> frozenset[str]:
    return ops(names) if isinstance(names, str) else ops(*names)


@dataclass(frozen=True)
class Found:
    """One structural match: bindings and the member nodes (sorted)."""

    bindings: Bindings
    members: tuple[int, ...]
    root: int
    extra: dict = field(default_factory=dict)


def match(p: Pat, g: Graph, root: int) -> Iterator[Found]:
    """Every way ``p`` matches with its root at node ``root``, most specific first."""
    n = g.nodes[root]
    if n.op in SOURCE_OPS or not n.outputs:
        return
    for b, members in _match(p, g, Ref(root, 0), {}, ()):
        yield Found(b, tuple(sorted(set(members))), root)


_OPERANDS: weakref.WeakKeyDictionary[Graph, list[tuple[Ref, ...]]] = weakref.WeakKeyDictionary()


def operands(g: Graph) -> list[tuple[Ref, ...]]:
    """Every node's Refs (args then kwargs), computed once per graph: analysis reads them often."""
    ops = _OPERANDS.get(g)
    if ops is None:
        ops = _OPERANDS[g] = [tuple(n.refs()) for n in g.nodes]
    return ops


def _operand_refs(g: Graph, n: Node) -> tuple[Ref, ...]:
    return operands(g)[n.id]


def _single_operand(g: Graph, n: Node) -> Ref | None:
    """The one tensor operand of ``n``, not counting 0-d ones (a scale kept in a tensor)."""
    refs = operands(g)[n.id]
    if len(refs) > 1:
        refs = [r for r in refs if g.meta(r).shape != ()]
    return refs[0] if len(refs) == 1 else None


def _match(p: Pat, g: Graph, ref: Ref, b: Bindings, members: tuple) -> Iterator[tuple[Bindings, tuple]]:
    if p.alts:
        for a in p.alts:
            for b2, m2 in _match(a, g, ref, b, members):
                if p.name is not None:
                    bound = b2.get(p.name)
                    if bound is not None and bound != ref:
                        continue
                    b2 = {**b2, p.name: ref}
                yield b2, m2
        return
    chain = [ref]
    if p.through:
        seen = {ref.node}
        while True:
            node = g.nodes[chain[-1].node]
            if node.op not in p.through:
                break
            nxt = _single_operand(g, node)
            if nxt is None or nxt.node in seen:
                break
            seen.add(nxt.node)
            chain.append(nxt)
    for depth in range(len(chain) - 1, -1, -1):  # deepest first: skip as much as possible
        skipped = tuple(r.node for r in chain[:depth])
        yield from _match_here(p, g, chain[depth], b, members + skipped)


def _match_here(p: Pat, g: Graph, ref: Ref, b: Bindings, members: tuple) -> Iterator[tuple[Bindings, tuple]]:
    node = g.nodes[ref.node]
    present = p.ops is None or node.op in p.ops
    if present:
        yield from _match_node(p, g, ref, node, b, members)
    if p.opt and p.src and p.src[0] is not None:
        yield from _match(p.src[0], g, ref, b, members)


def _match_node(p: Pat, g: Graph, ref: Ref, node: Node, b: Bindings,
                members: tuple) -> Iterator[tuple[Bindings, tuple]]:
    if p.out is not None and ref.index != p.out:
        return
    if p.where is not None and not p.where(g, node, ref):
        return
    if p.name is not None:
        bound = b.get(p.name)
        if bound is not None and bound != ref:
            return
        b = {**b, p.name: ref}
    structural = p.ops is not None or p.src is not None
    if structural and node.op in SOURCE_OPS and p.src:
        return
    if structural and node.op not in SOURCE_OPS:
        members = members + (node.id,)
    if not p.src:
        yield b, members
        return
    refs = _operand_refs(g, node)
    if len(refs) < len(p.src):
        return
    orders = [list(refs)]
    if p.commutative and len(refs) >= 2 and refs[0] != refs[1]:
        orders.append([refs[1], refs[0], *refs[2:]])
    for rs in orders:
        yield from _match_seq(p.src, rs, 0, g, b, members)


def _match_seq(pats: tuple[Pat | None, ...], refs: list[Ref], i: int, g: Graph, b: Bindings,
               members: tuple) -> Iterator[tuple[Bindings, tuple]]:
    if i == len(pats):
        yield b, members
        return
    sub = pats[i]
    if sub is None:
        yield from _match_seq(pats, refs, i + 1, g, b, members)
        return
    for b2, m2 in _match(sub, g, refs[i], b, members):
        yield from _match_seq(pats, refs, i + 1, g, b2, m2)
