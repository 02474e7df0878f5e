"""A cached plan re-instantiated on a graph of the same structure with other sizes.

A decode step with a growing KV cache records a new graph every step, equal to the last one but for
its ints (shapes, strides, view arguments, storage ids), constant digests and seeds: the same
``genie.graph.split`` skeleton. Its plan is the cached one, rewritten node by node:

- every fused group is matched again at its root, by its own rule, and annotated afresh on the new
  graph: facts that depend on sizes (the mask's causal alignment for this q_len/k_len, head_dim,
  the scale, conv strides) are derived again, never copied. The group must have the same members,
  and ``why_not_fusable`` must pass on the new graph (storage ids and writes are ints too);
- plain nodes take the new node's fields with the cached wiring (a node whose args did not change
  reuses the cached args; one whose ints moved has its Refs mapped again);
- stage starts and the last-use table are structural and kept; what depends on sizes or on writes
  (output readiness, residency, transfers, streamed inputs, costs) is recomputed.

Anything that does not hold makes ``instantiate`` return None, and the caller plans cold: a
re-instantiated plan is the cold plan's graph or nothing (a test compares their digests).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from genie.graph import CONST, Graph, Node, NodeWriter, Ref, Split, map_refs, outputs_tail
from genie.semantic._fold import Folder
from genie.semantic._fuse import FusedCall, fused_node, why_not_fusable
from genie.semantic._match import match
from genie.semantic._patterns import Match, MatchContext, Rule


@dataclass(frozen=True)
class Recipe:
    """What a cold plan keeps so that a graph of its structure can reuse it."""

    rules: tuple[Rule, ...]  # per match to derive again (fused groups first, then KV updates)
    roots: tuple[int, ...]
    members: tuple[tuple[int, ...], ...]
    modules: tuple[str, ...]
    n_fused: int  # the first n_fused matches become fused nodes, in that order
    src_of: tuple[int, ...]  # plan node id -> source node id (its root, for a fused node)
    fused_at: Mapping[int, int]  # plan node id -> index of its fused group
    src_args: tuple[tuple, ...]  # per plan node: the source node's args/kwargs it was built from
    src_kwargs: tuple[dict, ...]
    ref_map: Mapping[Ref, Ref]  # source values a fused node replaced -> the fused node
    new_id: tuple[int, ...]  # source node id -> plan node id (-1: removed)
    wire: WireRecipe | None = None  # how the plan graph's split follows from the source's
    costs: tuple = ()  # the cold plan graph's NodeCost per node: reused where nothing moved


@dataclass(frozen=True)
class WireRecipe:
    """The plan graph's template split (``genie.graph.split``) from its source's, without emitting it:
    a plain plan node has its source node's ints and strings in the same order (only its Refs,
    which are no holes, differ), so they are gathered; fused nodes (a few) are emitted."""

    texts: tuple[str | None, ...]  # per plan node: its skeleton text (None: fused, emitted anew)
    ints: np.ndarray  # per plan int: the source int it is (-1: a fused node's)
    strs: tuple[int, ...]  # per plan string: the source string it is
    fused: tuple[tuple[int, int], ...]  # per fused plan node (in node order): (first int, count)
    tail: str  # the skeleton after the nodes: the outputs


def _emit(n: Node) -> NodeWriter:
    e = NodeWriter()
    e.node(n)
    return e


def wire_recipe(src: Graph, plan: Graph, src_of: tuple[int, ...], fused_at: Mapping[int, int]) -> WireRecipe:
    """Cold, once per structure: where each of the plan graph's template holes comes from."""
    int_at, str_at, i, k = [], [], 0, 0
    for n in src.nodes:
        e = _emit(n)
        int_at.append((i, len(e.ints)))
        str_at.append((k, len(e.strs)))
        i, k = i + len(e.ints), k + len(e.strs)
    texts: list[str | None] = []
    ints: list[int] = []
    strs: list[int] = []
    fused = []
    for j, n in enumerate(plan.nodes):
        if j in fused_at:
            e = _emit(n)
            texts.append(None)
            fused.append((len(ints), len(e.ints)))
            ints.extend([-1] * len(e.ints))
            continue
        e = _emit(n)
        texts.append(e.text())
        first, count = int_at[src_of[j]]
        ints.extend(range(first, first + count))
        first, count = str_at[src_of[j]]
        strs.extend(range(first, first + count))
    tail = outputs_tail(plan.outputs)
    return WireRecipe(tuple(texts), np.array(ints, dtype=np.int64), tuple(strs), tuple(fused), tail)


def plan_split(w: WireRecipe, src: Split, plan: Graph) -> Split | None:
    """The split of ``plan`` (re-instantiated from ``src``'s graph), or None when a fused node's
    holes moved (its op changed): the caller then lets ``split`` emit it."""
    if not len(src.ints):
        return None
    ints = src.ints[np.maximum(w.ints, 0)]
    texts = list(w.texts)
    fused = iter(w.fused)
    for j, t in enumerate(w.texts):
        if t is not None:
            continue
        e = _emit(plan.nodes[j])
        first, count = next(fused)
        if len(e.ints) != count or e.strs:
            return None
        try:
            ints[first:first + count] = e.ints
        except OverflowError:  # as split: an int past int64 has no template
            return None
        texts[j] = e.text()
    skeleton = '{"nodes":[' + ",".join(texts) + w.tail  # type: ignore[arg-type]
    digest = hashlib.blake2b(skeleton.encode(), digest_size=16).hexdigest()
    return Split(skeleton, digest, ints, [src.strs[k] for k in w.strs])


def rematch(g: Graph, rule: Rule, root: int, members: tuple[int, ...], ctx: MatchContext,
            module: str) -> Match | None:
    """``rule`` matched at ``root`` of ``g`` with exactly ``members``, annotated on ``g``; else None.
    ``module`` is the cached match's (module paths are part of the structure)."""
    for f in match(rule.pattern, g, root):
        if f.members != members:
            continue
        info = rule.annotate(ctx, f) if rule.annotate is not None else {}
        if info is None:
            return None
        return Match(rule.kind, rule.form, root, f.members, f.bindings, dict(info), module)
    return None


def instantiate(recipe: Recipe, old: Graph, g: Graph,
                fusions: Mapping[str, Callable[[Graph, Match], FusedCall | str]],
                ) -> tuple[Graph, list[Match], list[FusedCall]] | None:
    """(plan graph for ``g``, the matches derived again, the fused calls), or None if the cached plan
    does not hold for ``g``. ``old`` is the cached plan's graph; ``g`` has its source's structure."""
    if len(g.nodes) != len(recipe.new_id):
        return None
    ctx = MatchContext(g, Folder(g))
    matches, calls = [], []
    for i, (rule, root, members) in enumerate(zip(recipe.rules, recipe.roots, recipe.members, strict=True)):
        m = rematch(g, rule, root, members, ctx, recipe.modules[i])
        if m is None:
            return None
        matches.append(m)
        if i < recipe.n_fused:
            build = fusions.get(m.kind)
            call = build(g, m) if build is not None else "no fusion for this kind"
            if isinstance(call, str) or call.members != members or why_not_fusable(g, call):
                return None
            calls.append(call)
    new_id, ref_map = recipe.new_id, recipe.ref_map

    def fix(r: Ref) -> Ref:
        hit = ref_map.get(r)
        return hit if hit is not None else Ref(new_id[r.node], r.index)

    nodes: list[Node] = []
    for j, src in enumerate(recipe.src_of):
        n = g.nodes[src]
        k = recipe.fused_at.get(j)
        if k is not None:
            nodes.append(fused_node(g, calls[k], j, n.module, fix))
            continue
        was = old.nodes[j]
        if n.args == recipe.src_args[j] and n.kwargs == recipe.src_kwargs[j]:
            args, kwargs = was.args, was.kwargs
        elif n.op == CONST:
            args, kwargs = n.args, {}
        else:
            args = map_refs(n.args, fix)
            kwargs = {key: map_refs(v, fix) for key, v in n.kwargs.items()}
        nodes.append(Node(j, n.op, args, kwargs, n.outputs, n.multi, n.storages, n.writes, n.module, n.seed))
    used = {n.args[0] for n in nodes if n.op == CONST}
    constants = {d: t for d, t in g.constants.items() if d in used}
    return Graph(nodes, list(old.outputs), constants), matches, calls
