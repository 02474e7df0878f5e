"""``schedule(graph, profile) -> ExecutionPlan``: fusion, stages, residency and transfer order.

Call tree::

    Scheduler(...).schedule(graph, profile)           cached by plan key (digest, or structure)
      key_by="structure", a cached skeleton:          no analysis
        instantiate(recipe, graph)                    groups matched and annotated again, nodes
                                                        rewritten by index (_instantiate)
      otherwise:
        fusion_calls(graph, profile)                  FUSIONS table: match kind -> fused call
          why_not_fusable(graph, call)                the rewrite must keep every other value
        fuse(graph, calls)                            the graph that runs (pure rewrite, _fuse)
        _stage_starts(plan_graph, ...)                where stages start, in program order:
                                                        hard breaks: a large input's first use,
                                                                     after a large output is final
                                                        soft breaks: module blocks, merged by FLOPs
      _assemble: StageSchedule.layout places every node; residency / transfers / liveness per value
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from genie.graph import (
    CONST,
    INPUT,
    RESIDENT,
    SOURCE_OPS,
    Graph,
    Ref,
    Split,
    StageSchedule,
    split,
    with_split,
)
from genie.semantic._analyzer import WorkloadProfile, analyze
from genie.semantic._annotate import arg
from genie.semantic._cost import GraphCost, NodeCost, graph_cost, node_cost
from genie.semantic._fuse import FusedCall, fuse_mapped, why_not_fusable
from genie.semantic._instantiate import Recipe, instantiate, plan_split, wire_recipe
from genie.semantic._lru import LRU
from genie.semantic._match import operands
from genie.semantic._patterns import Match, PatternRegistry, _common_module
from genie.semantic._phase import Phase, detect_phase
from genie.semantic._plan import ExecutionPlan, FusionGroup, Residency, Stage, Transfer
from genie.semantic._workload import WorkloadType

# genie.kernels' limits (kernels/_attention.py HEAD_DIMS, _dispatch.FLOAT_DTYPES); semantic may not
# import kernels, so they are repeated here and checked by the fused-execution tests.
ATTENTION_HEAD_DIMS = (16, 32, 64, 128, 256)
DECODE_MAX_Q_LEN = 16  # kernels/_decode.py MAX_Q_LEN: more queries than this run genie.attention


# -- fusion: match kind -> how to call the fused op ---------------------------------------------------
def _attention_call(g: Graph, m: Match) -> FusedCall | str:
    if not m.get("fusable"):
        return m.get("why") or "not fusable"
    if m["head_dim"] not in ATTENTION_HEAD_DIMS:
        return f"head_dim {m['head_dim']} has no kernel (supported: {ATTENTION_HEAD_DIMS})"
    b = m.bindings
    kwargs = {"causal": bool(m["causal"])}
    if m.get("scale") is not None:
        kwargs["scale"] = float(m["scale"])
    if m.get("q_len") is not None and m["q_len"] <= DECODE_MAX_Q_LEN and m["q_len"] < m["kv_len"]:
        # a few new queries against a cache: flash-decoding over k, all of it valid (the same
        # bottom-right causal convention). kv_len is a size: a re-instantiated plan derives it again.
        return FusedCall("attention", "genie.decode_attention", m.nodes, m.root,
                         (b["q"], b["k"], b["v"], int(m["kv_len"])), kwargs, (Ref(m.root, 0),), m.module)
    return FusedCall("attention", "genie.attention", m.nodes, m.root, (b["q"], b["k"], b["v"]), kwargs,
                     (Ref(m.root, 0),), m.module)


def _conv_call(g: Graph, m: Match) -> FusedCall | str:
    if not m.get("fusable"):
        return m.get("why") or "not fusable"
    b = m.bindings
    conv, bn = g.nodes[b["conv"].node], g.nodes[b["bn"].node]
    act = g.nodes[b["act"].node] if "act" in b else None
    bn_params = (arg(bn, "running_mean"), arg(bn, "running_var"), arg(bn, "weight"), arg(bn, "bias"),
                 float(arg(bn, "eps")))
    kwargs = {"bn": bn_params, "activation": m["activation"], "stride": list(m["stride"]),
              "padding": list(m["padding"]), "dilation": list(m["dilation"]), "groups": m["groups"]}
    value = Ref(m.root, 0)
    replaces = (value,) if act is None or not act.writes else (value, Ref(bn.id, 0))  # relu_: bn's value
    return FusedCall("conv_bn_act", "genie.conv2d_bn_act", m.nodes, m.root, (b["x"], b["w"], conv.args[2]),
                     kwargs, replaces, m.module)


FUSIONS: dict[str, Callable[[Graph, Match], FusedCall | str]] = {
    "attention": _attention_call,
    "conv_bn_act": _conv_call,
}


def fusion_calls(g: Graph, profile: WorkloadProfile,
                 fusions: Mapping[str, Callable[[Graph, Match], FusedCall | str]] = FUSIONS,
                 ) -> tuple[list[tuple[FusedCall, Match]], list[tuple[str, int, str]]]:
    calls, skipped, taken = [], [], set()
    for m in profile.matches:
        build = fusions.get(m.kind)
        if build is None:
            continue
        call = build(g, m)
        why = call if isinstance(call, str) else why_not_fusable(g, call)
        if not why and taken.intersection(call.members):
            why = "overlaps another fusion group"
        if why:
            skipped.append((m.kind, m.root, why))
            continue
        taken.update(call.members)
        calls.append((call, m))
    return calls, skipped


# -- the scheduler ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SchedulerConfig:
    fuse: bool = True
    max_stages: int = 32  # module blocks are merged (by FLOPs) down to about this many stages
    stream_min_bytes: int = 1 << 16  # an input this large starts a new stage where it is first read
    early_output_min_bytes: int = 1 << 16  # an output this large ends its stage as soon as it is final

    def fingerprint(self) -> str:
        return f"f{int(self.fuse)}s{self.max_stages}i{self.stream_min_bytes}o{self.early_output_min_bytes}"


class Scheduler:
    """Pure and synchronous: (Graph, WorkloadProfile) in, ExecutionPlan out, cached by plan key.

    ``key_by="digest"`` caches a plan per graph digest (structure, shapes and weights).
    ``key_by="structure"`` caches it per structure with sizes abstracted (``graph._template.split``):
    a graph with the cached structure but other sizes (decode step n+1 after step n) gets the cached
    plan re-instantiated on its sizes, with no analysis (``_instantiate``); what depends on sizes
    is derived again, and a plan that does not hold any more is made cold.
    """

    def __init__(self, *, fuse: bool = True, max_stages: int = 32, stream_min_bytes: int = 1 << 16,
                 early_output_min_bytes: int = 1 << 16, cache_size: int = 128,
                 fusions: Mapping[str, Callable[[Graph, Match], FusedCall | str]] | None = None,
                 key_by: str = "digest") -> None:
        if max_stages < 1:
            raise ValueError(f"max_stages must be >= 1, got {max_stages}")
        if key_by not in ("digest", "structure"):
            raise ValueError(f"key_by must be 'digest' or 'structure', got {key_by!r}")
        self.key_by = key_by
        self.config = SchedulerConfig(fuse, max_stages, stream_min_bytes, early_output_min_bytes)
        self.fusions = dict(FUSIONS if fusions is None else fusions)
        self._cache: LRU[str, ExecutionPlan] = LRU(cache_size)
        self._shapes: LRU[str, _Cached] = LRU(cache_size)  # key_by="structure": per skeleton
        self.reinstantiated = 0  # structure hits served by re-instantiation (no analysis)

    @property
    def hits(self) -> int:
        return self._cache.hits + self._shapes.hits

    @property
    def misses(self) -> int:
        return self._cache.misses + self._shapes.misses

    def key(self, graph: Graph, profile: WorkloadProfile) -> str:
        """The plan-cache key. ``graph.digest`` covers structure, shapes and weights."""
        return _hash(f"{graph.digest}|r{profile.registry_version}|{self._settings()}")

    def _settings(self) -> str:
        return f"{self.config.fingerprint()}|{','.join(sorted(self.fusions))}"

    def schedule(self, graph: Graph, profile: WorkloadProfile | None = None) -> ExecutionPlan:
        if self.key_by == "structure":
            parts = split(graph)
            if parts is not None:
                return self._by_structure(graph, profile, parts)
        profile = profile if profile is not None else analyze(graph)
        if profile.digest != graph.digest:
            raise ValueError("schedule: the profile was computed for another graph "
                             f"(digest {profile.digest[:12]}, graph {graph.digest[:12]})")
        key = self.key(graph, profile)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        plan, _ = self._schedule(graph, profile, lambda ready: key)
        self._cache.put(key, plan)
        return plan

    def cached(self, key: str) -> ExecutionPlan | None:
        """The plan cached under ``key`` (what a server looks up when a client sends only the key)."""
        hit = self._cache.peek(key)
        if hit is None and self.key_by == "structure":
            hit = next((c.plan for c in list(self._shapes._data.values()) if c.plan.key == key), None)
        return hit

    # -- plans by structure --------------------------------------------------------------------------
    def _by_structure(self, graph: Graph, profile: WorkloadProfile | None, parts: Split) -> ExecutionPlan:
        version = profile.registry_version if profile is not None else PatternRegistry.default().version
        skey = _hash(f"{parts.digest}|r{version}|{self._settings()}")
        hit = self._shapes.get(skey)
        if hit is not None:
            if hit.strs == parts.strs and np.array_equal(hit.ints, parts.ints):
                return hit.plan  # the very graph again
            if hit.recipe is not None:
                plan = self._reinstantiate(hit, graph, skey)
                if plan is not None:
                    self.reinstantiated += 1
                    return plan
        if profile is not None and profile.digest != graph.digest:
            raise ValueError("schedule: the profile was computed for another graph "
                             f"(digest {profile.digest[:12]}, graph {graph.digest[:12]})")
        plan, recipe = self._schedule(graph, profile if profile is not None else analyze(graph),
                                      lambda ready: _hash(f"{skey}|{ready}"))
        self._shapes.put(skey, _Cached(plan, recipe, parts.ints, parts.strs))
        return plan

    def _reinstantiate(self, hit: _Cached, graph: Graph, skey: str) -> ExecutionPlan | None:
        recipe, old = hit.recipe, hit.plan
        assert recipe is not None
        made = instantiate(recipe, old.graph, graph, self.fusions)
        if made is None:
            return None
        g, matches, calls = made
        parts = split(graph)
        if recipe.wire is not None and parts is not None:
            wire = plan_split(recipe.wire, parts, g)
            if wire is not None:  # the backend sends g by its template: spare emitting it
                with_split(g, wire)
        node_map = list(recipe.new_id)
        fused = matches[:recipe.n_fused]
        groups = tuple(FusionGroup(c.kind, c.op, c.members, node_map[c.root], c.module, dict(m.info))
                       for c, m in zip(calls, fused, strict=True))
        kv = {node_map[x] for m in matches[recipe.n_fused:] for x in (m.root, m.bindings["past"].node)
              if node_map[x] >= 0}
        phase = detect_phase(matches)[0] if old.phase is not Phase.NONE else Phase.NONE
        cost = _costs_again(g, old.graph, recipe.costs)
        return self._assemble(graph, g, node_map, groups, old.unfused, (), kv, old.workload, phase,
                              lambda ready: _hash(f"{skey}|{ready}"), skey, cost=cost, old=old)

    # -- the plan ------------------------------------------------------------------------------------
    def _schedule(self, src: Graph, profile: WorkloadProfile, key_of: Callable[[tuple[int, ...]], str],
                  ) -> tuple[ExecutionPlan, Recipe | None]:
        cfg = self.config
        calls, unfused = fusion_calls(src, profile, self.fusions) if cfg.fuse else ([], [])
        g, node_map, ref_map = fuse_mapped(src, [c for c, _ in calls])
        groups = tuple(FusionGroup(c.kind, c.op, c.members, node_map[c.root], c.module, dict(m.info))
                       for c, m in calls)
        kv_matches = profile.by_kind("kv_cache_update")
        kv = _kv_values(kv_matches, node_map)
        cost = graph_cost(g)
        out_ready = _output_ready(g)
        residency = _residency(g, kv)
        starts = _stage_starts(g, cost.nodes, cfg, out_ready, residency)
        plan = self._assemble(src, g, node_map, groups, tuple(unfused), starts, kv, profile.workload,
                              profile.phase, key_of, profile.digest, cost=cost)
        recipe = None
        if self.key_by == "structure":
            recipe = _recipe(src, g, node_map, ref_map, [m for _, m in calls], kv_matches, cost.nodes)
        return plan, recipe

    def _assemble(self, src: Graph, g: Graph, node_map: list[int], groups: tuple[FusionGroup, ...],
                  unfused: tuple, starts: tuple[int, ...], kv: set[int], workload: WorkloadType,
                  phase: Phase, key_of: Callable[[tuple[int, ...]], str], source_digest: str,
                  cost: GraphCost | None = None, old: ExecutionPlan | None = None) -> ExecutionPlan:
        """The plan for the fused graph ``g`` cut at ``starts`` (or as ``old``, a plan for a graph of
        the same structure, is cut): what follows from sizes is derived from ``g``."""
        cost = cost if cost is not None else graph_cost(g)
        out_ready = _output_ready(g)
        residency = _residency(g, kv)
        if old is None:
            last_use = _last_uses(g)
            stage_of, members = StageSchedule(starts, ()).layout(g)
            stages = _stage_records(g, members, stage_of, last_use, out_ready, residency, cost.nodes)
        else:  # the stages' membership and every value's last reader are structural
            last_use, stage_of = old.last_use, old.stage_of
            stages = _restaged(old.stages, g, stage_of, out_ready, residency, cost.nodes)
        uploads, downloads = _transfers(g, stages, stage_of, out_ready, residency)
        weight_bytes = sum(t.nbytes for t in uploads if t.pinned)
        # large inputs follow the run in their own frames, first use first: early stages start
        # computing while they are still arriving
        stream = tuple(t.key for t in uploads if not t.pinned and t.nbytes >= self.config.stream_min_bytes)
        key = key_of(tuple(stage_of[r] for r in out_ready))
        return ExecutionPlan(key, source_digest, g, tuple(node_map), workload, phase,
                             tuple(stages), groups, unfused, residency, uploads, downloads,
                             tuple(stage_of), last_use, weight_bytes, stream)


@dataclass(frozen=True)
class _Cached:
    plan: ExecutionPlan
    recipe: Recipe | None  # None: this plan cannot be re-instantiated (an ambiguous rule)
    ints: np.ndarray  # the split of the graph it was made for: the same graph is the same plan
    strs: list[str]


def _costs_again(g: Graph, old: Graph, costs: tuple[NodeCost, ...]) -> GraphCost:
    """``graph_cost(g)``, reusing the cost of each node of ``old`` (same structure) whose args,
    outputs and operands' outputs did not move: a decode step resizes about a third of them."""
    ops = operands(g)
    moved = [a.outputs != b.outputs or a.args != b.args or a.kwargs != b.kwargs
             for a, b in zip(g.nodes, old.nodes, strict=True)]
    per = tuple(node_cost(g, n) if moved[n.id] or any(moved[r.node] for r in ops[n.id]) else costs[n.id]
                for n in g.nodes)
    return GraphCost(per, sum(c.flops for c in per), sum(c.bytes for c in per))


def _hash(raw: str) -> str:
    return hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()


def _recipe(src: Graph, g: Graph, node_map: list[int], ref_map: dict[Ref, Ref], fused: list[Match],
            kv: tuple[Match, ...], costs: tuple[NodeCost, ...]) -> Recipe | None:
    rules = []
    for m in (*fused, *kv):
        found = PatternRegistry.default()._rules_named(m.kind, m.form)
        if len(found) != 1:
            return None  # a rule of another registry, or two of one name: plan such graphs cold
        rules.append(found[0])
    src_of = [0] * len(g.nodes)
    for i, j in enumerate(node_map):
        if j >= 0:
            src_of[j] = i
    every = (*fused, *kv)
    fused_at = {node_map[m.root]: k for k, m in enumerate(fused)}
    return Recipe(tuple(rules), tuple(m.root for m in every), tuple(m.nodes for m in every),
                  tuple(m.module for m in every), len(fused), tuple(src_of), fused_at,
                  tuple(src.nodes[i].args for i in src_of), tuple(src.nodes[i].kwargs for i in src_of),
                  dict(ref_map), tuple(node_map), wire_recipe(src, g, tuple(src_of), fused_at), costs)


@functools.cache  # one shared instance; a racing first call builds a spare, harmlessly
def default_scheduler() -> Scheduler:
    return Scheduler()


@functools.cache
def run_scheduler() -> Scheduler:
    """The scheduler every run path uses (device-mode flushes, ``genie.execute``, compile replays):
    plans keyed by structure, so a graph that differs from a planned one only by sizes pays no
    analysis."""
    return Scheduler(key_by="structure")


def schedule(graph: Graph, profile: WorkloadProfile | None = None) -> ExecutionPlan:
    """The ExecutionPlan for ``graph`` (analysed first when no profile is given); cached by digest."""
    return default_scheduler().schedule(graph, profile)


# -- pieces -------------------------------------------------------------------------------------------
def _last_uses(g: Graph) -> dict[int, int]:
    last: dict[int, int] = {}
    ops = operands(g)
    for n in g.nodes:
        for r in ops[n.id]:
            last[r.node] = n.id
    return last


def _kv_values(matches: tuple[Match, ...], node_map: list[int]) -> set[int]:
    """plan.graph ids of KV cache values: the past (if resident) and the updated cache."""
    out = set()
    for m in matches:
        for nid in (m.root, m.bindings["past"].node):
            if node_map[nid] >= 0:
                out.add(node_map[nid])
    return out


def _output_ready(g: Graph) -> list[int]:
    """For each graph output, the node after which its value is final (its last writer, if later)."""
    writers: dict[int, int] = {}
    for n in g.nodes:
        for s in n.writes:
            writers[s] = n.id
    ready = []
    for r in g.outputs:
        s = g.nodes[r.node].storages[r.index] if g.nodes[r.node].storages else None
        ready.append(max(r.node, writers.get(s, -1)))
    return ready


def _residency(g: Graph, kv: set[int]) -> dict[int, Residency]:
    outputs = {r.node for r in g.outputs}
    res: dict[int, Residency] = {}
    for n in g.nodes:
        if n.op == CONST:
            res[n.id] = Residency.WEIGHT
        elif n.op == RESIDENT:
            res[n.id] = Residency.KV_CACHE if n.id in kv else Residency.RESIDENT
        elif n.id in kv and n.id in outputs:
            res[n.id] = Residency.KV_CACHE
        elif n.op == INPUT:
            res[n.id] = Residency.INPUT
        elif n.id in outputs:
            res[n.id] = Residency.OUTPUT
        else:
            res[n.id] = Residency.ACTIVATION
    return res


@lru_cache(maxsize=4096)
def _block(module: str) -> str:
    """The repeated block a module belongs to: its path up to the first list index."""
    parts = module.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2])


def _stage_starts(g: Graph, costs, cfg: SchedulerConfig, out_ready: list[int],
                  residency: dict[int, Residency]) -> tuple[int, ...]:
    """Where stages start (compute node ids): ``StageSchedule.layout`` places every node from these.

    Hard breaks: a large input's first reader. Early breaks: just after a large output is final.
    Soft breaks: module block boundaries, taken once a stage holds its share of the FLOPs.
    """
    compute = [n.id for n in g.nodes if n.op not in SOURCE_OPS]
    if not compute:
        return ()
    hard, early = _hard_breaks(g, cfg, out_ready, residency, compute)
    soft = {compute[i] for i in range(1, len(compute))
            if _block(g.nodes[compute[i]].module) != _block(g.nodes[compute[i - 1]].module)}
    target = (sum(costs[nid].flops for nid in compute) or 1) / cfg.max_stages
    suffix, run = {}, 0
    for nid in reversed(compute):
        run += costs[nid].flops
        suffix[nid] = run
    starts, acc = [compute[0]], 0
    for nid in compute:  # a soft break needs enough work on both sides: no 1-FLOP stages
        balanced = acc >= target and suffix[nid] >= target / 2
        if nid != compute[0] and (nid in hard or nid in early or (nid in soft and balanced)):
            starts.append(nid)
            acc = 0
        acc += costs[nid].flops
    # a sliver between an early output and the next break joins the stage before it
    flops = {s: 0 for s in starts}
    owner = compute[0]
    for nid in compute:
        owner = nid if nid in flops else owner
        flops[owner] += costs[nid].flops
    return tuple(s for i, s in enumerate(starts) if i == 0 or s in hard or flops[s] >= target / 2
                 or i + 1 == len(starts))


def _hard_breaks(g: Graph, cfg: SchedulerConfig, out_ready: list[int], residency: dict[int, Residency],
                 compute: list[int]) -> tuple[set[int], set[int]]:
    """(first readers of large inputs, nodes right after a large output is final)."""
    first_use: dict[int, int] = {}
    for n in g.nodes:
        for r in operands(g)[n.id]:
            first_use.setdefault(r.node, n.id)
    hard = {first_use[n.id] for n in g.nodes
            if n.op == INPUT and n.outputs[0].nbytes >= cfg.stream_min_bytes and n.id in first_use}
    hard.discard(compute[0])
    early: set[int] = set()
    pos = {nid: i for i, nid in enumerate(compute)}
    for i, r in enumerate(g.outputs):
        if residency.get(r.node) is Residency.OUTPUT and g.meta(r).nbytes >= cfg.early_output_min_bytes:
            p = pos.get(out_ready[i])
            if p is not None and p + 1 < len(compute):
                early.add(compute[p + 1])
    return hard, early


def _stage_records(g: Graph, members: list[list[int]], stage_of: list[int], last_use: dict[int, int],
                   out_ready: list[int], residency: dict[int, Residency], costs) -> list[Stage]:
    out_nodes = {r.node for r in g.outputs}
    ops = operands(g)
    frees: dict[int, list[int]] = {}  # stage -> values dead once it ends
    for v, u in last_use.items():
        if v not in out_nodes and residency.get(v) in (Residency.ACTIVATION, Residency.INPUT):
            frees.setdefault(stage_of[u], []).append(v)
    stages = []
    for k, ids in enumerate(members):
        inside = set(ids)
        needs = tuple(dict.fromkeys(r for nid in ids for r in ops[nid] if r.node not in inside))
        compute = [nid for nid in ids if g.nodes[nid].op not in SOURCE_OPS]
        mods = [g.nodes[nid].module for nid in compute]
        blocks = list(dict.fromkeys(_block(m) for m in mods if m))
        name = _common_module(mods) or (f"{blocks[0]} .. {blocks[-1]}" if len(blocks) > 1 else
                                         blocks[0] if blocks else "(outside modules)")
        ready = tuple(i for i, nid in enumerate(out_ready) if stage_of[nid] == k)
        keep = tuple(i for i in ready if residency.get(g.outputs[i].node) is Residency.KV_CACHE)
        stages.append(Stage(
            k, name, tuple(ids), needs,
            tuple(g.nodes[nid].args[0] for nid in ids if g.nodes[nid].op == INPUT),
            tuple(g.nodes[nid].args[0] for nid in ids if g.nodes[nid].op == CONST),
            ready, keep, tuple(sorted(frees.get(k, ()))),
            tuple(nid for nid in compute if g.nodes[nid].op.startswith("genie.")),
            sum(costs[nid].flops for nid in compute), sum(costs[nid].bytes for nid in compute)))
    return stages


def _restaged(old: tuple[Stage, ...], g: Graph, stage_of: tuple[int, ...], out_ready: list[int],
              residency: dict[int, Residency], costs) -> list[Stage]:
    """``old``'s stages on a graph of the same structure: membership, needs, names and frees are
    structural and kept; what a node's ints or a constant's digest decide is derived from ``g``."""
    ready: list[list[int]] = [[] for _ in old]
    for i, nid in enumerate(out_ready):
        ready[stage_of[nid]].append(i)
    out = []
    for s in old:
        nodes = [g.nodes[nid] for nid in s.nodes]
        compute = [n.id for n in nodes if n.op not in SOURCE_OPS]
        out.append(replace(
            s, uploads=tuple(n.args[0] for n in nodes if n.op == INPUT),
            weights=tuple(n.args[0] for n in nodes if n.op == CONST), ready_outputs=tuple(ready[s.index]),
            keep_outputs=tuple(i for i in ready[s.index]
                               if residency.get(g.outputs[i].node) is Residency.KV_CACHE),
            flops=sum(costs[nid].flops for nid in compute), bytes=sum(costs[nid].bytes for nid in compute)))
    return out


def _transfers(g: Graph, stages: list[Stage], stage_of: list[int], out_ready: list[int],
               residency: dict[int, Residency]) -> tuple[tuple[Transfer, ...], tuple[Transfer, ...]]:
    first_use: dict[int, int] = {}
    ops = operands(g)
    for n in g.nodes:
        for r in ops[n.id]:
            first_use.setdefault(r.node, n.id)
    ups = []
    for n in g.nodes:
        if n.op == INPUT or n.op == CONST:
            when = first_use.get(n.id, n.id)
            weight = n.op == CONST
            what = f"weight {n.args[0][:8]}" if weight else f"input {n.args[0]}"
            ups.append((when, Transfer("upload", n.id, what, n.args[0], n.outputs[0].nbytes,
                                       stage_of[n.id], pinned=weight)))
    ups.sort(key=lambda t: (t[0], t[1].node))
    downs = []
    for i, r in enumerate(g.outputs):
        if residency.get(r.node) is Residency.KV_CACHE:
            continue
        downs.append(Transfer("download", r.node, f"output {i}", i, g.meta(r).nbytes, stage_of[out_ready[i]]))
    downs.sort(key=lambda t: (t.stage, t.key))
    return tuple(t for _, t in ups), tuple(downs)
