"""Device-mode flush replays: a flush whose program was seen before skips planning and encoding.

A decode step in device mode records the same aten program every step; only the values it reads
change (the handles of the KV cache and the last token, the new position's constant digest, the
seeds of random ops). ``planned_for_flush`` would re-plan that graph (re-matching fused groups)
and the session would re-emit its template split (JSON) each time. Here a flush's graph is keyed,
and a key seen before reuses the plan graph and its split with the new handles, digests and seeds
put in (as ``genie.compile``'s replays do): the run goes out as a slot replay with a few
corrections. Call tree::

    FLUSHES.planned(graph, fetch, keep)             the recorder's flush, after build_graph
      sized_key -> _Slot                            ops, storages, writes, outputs, fetch/keep,
                                                    planner: cheap to hash
      flush_key -> slot.find                        the exact key, found by equality
      hit: _Entry.replay                            the plan graph and split, values put in
      else, a plan that is the graph itself: _Resized.replay   any sizes: only the nodes whose
                                                    sizes moved are re-encoded (``generate``'s
                                                    growing ``input_ids``, a growing cache)
      else: planned_for_flush, and learn (an entry once a key is seen a second time)

The exact key (``flush_key``): every node's op, arguments (Python scalars typed: ``1``, ``1.0``,
``True`` and ``-0.0`` differ), keyword arguments, output metadata (shapes, strides, dtypes),
storages (aliasing: which values share memory) and writes (in-place ops), module path, whether it
is random; the source nodes' kinds, metadata and storages; the outputs, which are fetched and which
kept; the planner's settings. Abstracted: resident handles, constant digests and seeds, which are
template holes on the wire too.

When unsure, miss (the full path runs, and gives the answer it always gave):
- a graph with INPUT nodes, or a node whose metadata is not known yet;
- a key seen once (an entry is made when it comes again); sizes that change at every flush stop
  being keyed after UNSTABLE_AFTER new keys in a row (but for one flush in REPROBE_EVERY);
- a plan whose values cannot be traced back to the graph's sources one to one;
- a plan with fused groups when a small constant changed: fusion facts (a mask's causality, a
  scale) may have been folded from constant values, so that plan only holds for those values;
- a re-encoded node whose skeleton text is not the template's.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from genie.graph import (
    CONST,
    INPUT,
    RESIDENT,
    SOURCE_OPS,
    Graph,
    Node,
    NodeWriter,
    Ref,
    Split,
    outputs_tail,
    split,
    with_split,
)
from genie.runtime._execute import planned_for_flush
from genie.semantic import PatternRegistry, run_scheduler

MAX_KEYS = 64  # flush programs remembered by sized key (LRU), seen-once keys included
EXACT_PER_SLOT = 8  # exact keys remembered per sized key (LRU)
UNSTABLE_AFTER = 4  # new exact keys in a row (sizes that never repeat) before a slot stops keying,
REPROBE_EVERY = 8  # but for one flush in this many
FOLDABLE_NUMEL = 1 << 22  # constants the planner may fold (genie.semantic's Folder bound)
_SEEN = object()  # a key met once: an entry is made if it comes again
_UNREPLAYABLE = object()  # a key whose plan cannot be replayed: always the full path


@dataclass
class FlushStats:
    hits: int = 0  # flushes sent as replays of a remembered plan (exact key)
    resized: int = 0  # flushes sent as replays of a plan that is the graph itself (sized key)
    misses: int = 0  # flushes planned in full (first sight, unreplayable, or a guard failed)
    entries: int = 0  # replay entries made


STATS = FlushStats()


_AS_IS = frozenset({int, Ref, str, type(None)})  # key parts as they are: no two of them compare equal


def _frozen(v: object) -> object:
    """``v`` as a hashable key part in which values that compare equal across types (``1``,
    ``1.0``, ``True``) or that compare equal but act differently (``0.0``, ``-0.0``) stay apart."""
    t = type(v)
    if t is int or t is Ref or t is str or v is None:
        return v
    if t is float:
        return (float, v.hex())
    if t is tuple or t is list:
        if set(map(type, v)) <= _AS_IS:  # sizes, dims, refs: the common case, in C
            return (t, tuple(v))
        return (t, tuple([_frozen(x) for x in v]))
    if t is complex:
        return (complex, v.real.hex(), v.imag.hex())
    return (t, v)  # bool, dtype, device, layout, memory_format: hashable, equal by value


def flush_key(graph: Graph, fetch: list[int], keep: list[int]) -> tuple | None:
    """What makes ``graph`` (with these fetch/keep positions) the program it is, its source values
    aside; None when it is not a replay candidate. ``key[0]`` holds one part per node."""
    parts: list = []
    add = parts.append
    for n in graph.nodes:
        op = n.op
        if op in SOURCE_OPS:
            if op == INPUT:
                return None
            add((op, n.outputs, n.storages))
            continue
        if not n.outputs:
            return None  # an op whose output shape depends on data: learnt from this very run
        args = n.args
        for a in args:
            if type(a) is not Ref and type(a) is not int:
                args = _frozen(args)
                break
        kwargs = tuple([(k, _frozen(v)) for k, v in n.kwargs.items()]) if n.kwargs else ()
        add((op, args, kwargs, n.outputs, n.multi, n.storages, n.writes, n.module, n.seed is None))
    return (tuple(parts), tuple(graph.outputs), tuple(fetch), tuple(keep), _planner())


def sized_key(graph: Graph, fetch: list[int], keep: list[int]) -> tuple:
    """``flush_key`` with sizes and other values left out: the ops in order, storages and writes
    (aliasing, in-place ops), outputs, fetch/keep, the planner (wiring is checked on the template's
    skeleton). Keys the replays of plans that hold for any sizes; cheap to hash (ints and strs)."""
    return (tuple([(n.op, n.storages, n.writes) for n in graph.nodes]), tuple(graph.outputs), tuple(fetch),
            tuple(keep), _planner())


def _planner() -> tuple:
    """The planner's settings: a registered pattern or another fusion table plans anew."""
    s = run_scheduler()
    return (PatternRegistry.default().version, s.config.fingerprint(),
            tuple(sorted((k, id(v)) for k, v in s.fusions.items())))


@dataclass
class _Entry:
    plan: Graph  # the recording's plan graph
    run: dict  # planned_for_flush's run arguments (stages, stream)
    parts: Split  # the plan graph's template split
    residents: list[tuple[int, int, int]]  # (plan node, source graph node, position in parts.ints)
    consts: list[tuple[int, int, int]]  # (plan node, source graph node, position in parts.strs)
    seeds: list[tuple[int, int, int]]  # (plan node, source graph node, position in parts.ints)
    watched: list[tuple[int, str]]  # (source graph node, digest): a change there misses

    def replay(self, graph: Graph, constants_of: Callable[[Graph], dict]) -> tuple[Graph, dict] | None:
        g = graph.nodes
        for i, digest in self.watched:
            if g[i].args[0] != digest:
                return None
        nodes = list(self.plan.nodes)
        ints = self.parts.ints.copy()
        strs = list(self.parts.strs)
        for j, i, pos in self.residents:
            h = g[i].args[0]
            if nodes[j].args[0] != h:
                nodes[j] = nodes[j].replace(args=(h,))
                ints[pos] = h
        for j, i, pos in self.consts:
            d = g[i].args[0]
            if nodes[j].args[0] != d:
                nodes[j] = nodes[j].replace(args=(d,))
                strs[pos] = d
        for j, i, pos in self.seeds:
            s = g[i].seed
            if nodes[j].seed != s:
                nodes[j] = nodes[j].replace(seed=s)
                ints[pos] = s
        plan = _with_nodes(self.plan, nodes)
        plan.constants = constants_of(plan)
        with_split(plan, Split(self.parts.skeleton, self.parts.digest, ints, strs))
        return plan, dict(self.run)


_CACHED = tuple(k for k, v in vars(Graph).items() if isinstance(v, functools.cached_property))


def _with_nodes(graph: Graph, nodes: list[Node]) -> Graph:
    """``graph`` with source nodes swapped for others of the same id, op and meta (what the
    constructor checked still holds); analyses of the old nodes and its split are dropped."""
    g = copy.copy(graph)
    g.nodes = nodes
    for k in (*_CACHED, "_split"):
        g.__dict__.pop(k, None)
    return g


def _entry(graph: Graph, plan: Graph, run: dict) -> _Entry | None:
    """How to replay ``plan`` for a later graph of ``graph``'s key, or None if it cannot be."""
    if any(n.op == INPUT for n in plan.nodes):
        return None
    where: dict[tuple[str, object], list[int]] = {}  # (kind, value) -> the source graph nodes holding it
    for n in graph.nodes:
        for pair in _values(n):
            where.setdefault(pair, []).append(n.id)
    # a value held by two sources (weights of equal bytes: LayerNorm's ones and zeros) cannot be
    # told apart in the plan: it is watched instead (a replay needs it unchanged at each of them)
    twice = [(kind, value, ids) for (kind, value), ids in where.items() if len(ids) > 1]
    if any(kind == "seed" for kind, _, _ in twice):
        return None
    watched = [(i, value) for _, value, ids in twice for i in ids]
    residents, consts, seeds = [], [], []
    used: set[int] = set()
    for n in plan.nodes:
        for kind, value in _values(n):
            ids = where.get((kind, value))
            if ids is None:
                return None  # a value the plan made up: nothing to put in for it
            used.update(ids)
            if len(ids) == 1:
                {CONST: consts, RESIDENT: residents, "seed": seeds}[kind].append((n.id, ids[0]))
    parts = split(plan)
    if parts is None:
        return None
    plan_consts = [n for n in plan.nodes if n.op == CONST]
    if len(parts.strs) != len(plan_consts) or any(s != n.args[0] for s, n in zip(parts.strs, plan_consts,
                                                                                   strict=True)):
        return None
    # the int holes of handles and seeds: those that move when every one of them moves
    probe = [n.replace(args=(n.args[0] + 1,)) if n.op == RESIDENT else n for n in plan.nodes]
    probe = [n.replace(seed=n.seed + 1) if n.seed is not None else n for n in probe]
    moved = np.flatnonzero(split(Graph(probe, plan.outputs)).ints != parts.ints).tolist()
    every = [n.id for n in plan.nodes if n.op == RESIDENT or n.seed is not None]
    if len(moved) != sum((plan.nodes[j].op == RESIDENT) + (plan.nodes[j].seed is not None) for j in every):
        return None
    at = dict(zip(every, _per_node(plan, every, moved), strict=True))
    fused = any(n.op.startswith("genie.") and n.op not in SOURCE_OPS for n in plan.nodes)
    watched += [(n.id, n.args[0]) for n in graph.nodes if n.op == CONST and (
        n.id not in used or (fused and _numel(n) <= FOLDABLE_NUMEL))]
    const_pos = {n.id: k for k, n in enumerate(plan_consts)}
    return _Entry(plan, dict(run), parts,
                  [(j, i, at[j][0]) for j, i in residents],
                  [(j, i, const_pos[j]) for j, i in consts],
                  [(j, i, at[j][-1]) for j, i in seeds], watched)


def _values(n: Node) -> list[tuple[str, object]]:
    """The values a replay puts in for node ``n``: its handle or digest, its seed."""
    out: list[tuple[str, object]] = [(n.op, n.args[0])] if n.op in (CONST, RESIDENT) else []
    if n.seed is not None:
        out.append(("seed", n.seed))
    return out


def _per_node(plan: Graph, nodes: list[int], moved: list[int]) -> list[list[int]]:
    """The moved int positions, handed out in node order: a node moves one int per resident
    handle and one per seed."""
    it = iter(moved)
    out: list[list[int]] = []
    for j in nodes:
        n = plan.nodes[j]
        count = (n.op == RESIDENT) + (n.seed is not None)
        out.append([next(it) for _ in range(count)])
    return out


def _numel(n: Node) -> int:
    return n.outputs[0].numel if n.outputs else 0


@dataclass
class _Resized:
    """A plan that is the graph itself (nothing fused), so that it holds for any sizes: a graph
    of its sized key runs as it is, and only its template split is patched, node by node, where
    the node's exact key part moved (a growing ``input_ids`` in ``generate``, a growing cache)."""

    sig: tuple  # the recording graph's exact key parts, per node
    texts: list[str]  # per node: its skeleton text
    int_at: list[tuple[int, int]]  # per node: (first int hole, how many)
    parts: Split  # the recording graph's split
    run: dict
    residents: list[int]  # RESIDENT nodes: the handle is the node's first int
    seeded: list[int]  # random nodes: the seed is the node's last int
    consts: list[int]  # CONST nodes, in order: the string holes

    def replay(self, graph: Graph, sig: tuple) -> tuple[Graph, dict] | None:
        if len(sig) != len(self.sig):
            return None
        nodes = graph.nodes
        ints = self.parts.ints.copy()
        for i, (a, b) in enumerate(zip(sig, self.sig, strict=True)):
            if a is b or a == b:
                continue
            e = NodeWriter()
            e.node(nodes[i])
            first, count = self.int_at[i]
            if len(e.ints) != count or e.text() != self.texts[i]:
                return None  # another skeleton: not this template
            try:
                ints[first:first + count] = e.ints
            except OverflowError:
                return None
        try:
            for i in self.residents:
                ints[self.int_at[i][0]] = nodes[i].args[0]
            for i in self.seeded:
                first, count = self.int_at[i]
                ints[first + count - 1] = nodes[i].seed
        except OverflowError:
            return None
        strs = [nodes[i].args[0] for i in self.consts]
        with_split(graph, Split(self.parts.skeleton, self.parts.digest, ints, strs))
        return graph, dict(self.run)


def _resized(graph: Graph, plan: Graph, run: dict, sig: tuple) -> _Resized | None:
    """How to replay a plan for graphs of ``graph``'s sized key, or None unless the plan is the
    graph itself."""
    if plan is not graph and (len(plan.nodes) != len(graph.nodes) or any(
            (p.op, p.args, p.kwargs, p.outputs, p.multi, p.storages, p.writes, p.seed)
            != (n.op, n.args, n.kwargs, n.outputs, n.multi, n.storages, n.writes, n.seed)
            for p, n in zip(plan.nodes, graph.nodes, strict=True))):
        return None
    parts = split(graph)
    if parts is None:
        return None
    texts, int_at, first = [], [], 0
    for n in graph.nodes:
        e = NodeWriter()
        e.node(n)
        texts.append(e.text())
        int_at.append((first, len(e.ints)))
        first += len(e.ints)
    skeleton = '{"nodes":[' + ",".join(texts) + outputs_tail(graph.outputs)
    if first != len(parts.ints) or skeleton != parts.skeleton:
        return None
    consts = [n.id for n in graph.nodes if n.op == CONST]
    if len(consts) != len(parts.strs):
        return None
    return _Resized(sig, texts, int_at, parts, dict(run), [n.id for n in graph.nodes if n.op == RESIDENT],
                    [n.id for n in graph.nodes if n.seed is not None], consts)


class _Slot:
    """The programs of one sized key: its resized plan (or how far learning it got), and the exact
    keys seen under it with their entries, most recent first. Exact keys are found by equality,
    never hashed: equality stops at identical objects (the shape cache hands out the same output
    metadata every step), where a hash would walk every TensorMeta in Python."""

    __slots__ = ("sized", "resized", "exact", "fresh", "skipped")

    def __init__(self, sized: tuple) -> None:
        self.sized = sized
        self.resized: object = None
        self.fresh = 0  # flushes in a row whose exact key was new
        self.skipped = 0
        self.exact: list[list] = []  # [key, entry]

    def find(self, key: tuple) -> object:
        for i, pair in enumerate(self.exact):
            if pair[0] == key:
                if i:
                    self.exact.insert(0, self.exact.pop(i))
                return pair[1]
        return None

    def put(self, key: tuple, entry: object) -> None:
        for pair in self.exact:
            if pair[0] == key:
                pair[1] = entry
                return
        self.exact.insert(0, [key, entry])
        del self.exact[EXACT_PER_SLOT:]


class FlushReplays:
    """The flush programs of this process, by key (shared by every recorder: the plan is a pure
    function of the graph)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: OrderedDict[int, _Slot] = OrderedDict()  # by the sized key's hash

    def planned(self, graph: Graph, fetch: list[int], keep: list[int],
                constants_of: Callable[[Graph], dict]) -> tuple[Graph, dict]:
        """``planned_for_flush(graph)``, from a remembered plan when ``graph``'s key was seen: the
        exact key (sizes included) first, then the sized key (a plan that is the graph itself)."""
        sized = sized_key(graph, fetch, keep)
        h = hash(sized)  # once: a sized key is a thousand tuples
        with self._lock:
            slot = self._slots.get(h)
            if slot is None or slot.sized != sized:  # (a hash collision replaces the older)
                slot = self._slots[h] = _Slot(sized)
                while len(self._slots) > MAX_KEYS:
                    self._slots.popitem(last=False)
            self._slots.move_to_end(h)
        resized = slot.resized
        if slot.fresh >= UNSTABLE_AFTER and not isinstance(resized, _Resized):
            slot.skipped += 1  # sizes move at every flush (a growing cache, a fused plan): plan,
            if slot.skipped % REPROBE_EVERY:  # and look again now and then
                STATS.misses += 1
                return planned_for_flush(graph)
        key = flush_key(graph, fetch, keep)
        if key is None:
            STATS.misses += 1
            return planned_for_flush(graph)
        with self._lock:
            entry = slot.find(key)
        if isinstance(entry, _Entry):
            hit = entry.replay(graph, constants_of)
            if hit is not None:
                STATS.hits += 1
                slot.fresh = 0
                return hit
        if isinstance(resized, _Resized):
            hit = resized.replay(graph, key[0])
            if hit is not None:
                STATS.resized += 1
                return hit
        STATS.misses += 1
        plan, run = planned_for_flush(graph)
        slot.fresh = slot.fresh + 1 if entry is None else 0  # first sights in a row
        if entry is not _UNREPLAYABLE:
            if entry is None:
                made: object = _SEEN
            else:  # seen before, or a guard failed: (re)learn from this plan
                made = _entry(graph, plan, run) or _UNREPLAYABLE
                if isinstance(entry, _Entry) and isinstance(made, _Entry) and made.watched:
                    made = _UNREPLAYABLE  # its watched constants change between flushes: never replays
                STATS.entries += isinstance(made, _Entry)
            with self._lock:
                slot.put(key, made)
        if resized is None or resized is _SEEN:
            made = _SEEN if resized is None else (_resized(graph, plan, run, key[0]) or _UNREPLAYABLE)
            STATS.entries += isinstance(made, _Resized)
            slot.resized = made
        return plan, run

    def clear(self) -> None:
        with self._lock:
            self._slots.clear()


FLUSHES = FlushReplays()


def flush_stats() -> dict[str, int]:
    """Counters for ``genie.stats()``."""
    return {"flush_replays": STATS.hits + STATS.resized, "flush_replays_resized": STATS.resized,
            "flush_replay_misses": STATS.misses,
            "flush_replay_entries": STATS.entries}
