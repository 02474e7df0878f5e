"""``schedule(graph, profile) -> ExecutionPlan``: fusion, stages, residency and transfer order.

Call tree::

    Scheduler(...).schedule(graph, profile)           cached by plan key (digest + settings)
      fusion_calls(graph, profile)                    FUSIONS table: match kind -> fused call
        why_not_fusable(graph, call)                  the rewrite must keep every other value
      fuse(graph, calls)                              the graph that runs (pure rewrite, _fuse)
      _stages(plan_graph, ...)                        contiguous runs in program order:
                                                        hard breaks: a large input's first use,
                                                                     after a large output is final
                                                        soft breaks: module blocks, merged by FLOPs
      _residency / _transfers / _liveness             per value: where it lives, when it moves, frees
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from genie.graph import CONST, INPUT, RESIDENT, SOURCE_OPS, Graph, Ref
from genie.semantic._analyzer import WorkloadProfile, analyze
from genie.semantic._annotate import arg
from genie.semantic._cost import graph_cost
from genie.semantic._fuse import FusedCall, fuse, why_not_fusable
from genie.semantic._lru import LRU
from genie.semantic._match import operands
from genie.semantic._patterns import Match, _common_module
from genie.semantic._plan import ExecutionPlan, FusionGroup, Residency, Stage, Transfer

# genie.kernels' limits (kernels/_attention.py HEAD_DIMS, _dispatch.FLOAT_DTYPES); semantic may not
# import kernels, so they are repeated here and checked by the fused-execution tests.
ATTENTION_HEAD_DIMS = (16, 32, 64, 128, 256)


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
    """Pure and synchronous: (Graph, WorkloadProfile) in, ExecutionPlan out, cached by plan key."""

    def __init__(self, *, fuse: bool = True, max_stages: int = 32, stream_min_bytes: int = 1 << 16,
                 early_output_min_bytes: int = 1 << 16, cache_size: int = 128,
                 fusions: Mapping[str, Callable[[Graph, Match], FusedCall | str]] | None = None,
                 key_by: str = "digest") -> None:
        if max_stages < 1:
            raise ValueError(f"max_stages must be >= 1, got {max_stages}")
        if key_by == "structure":
            raise NotImplementedError(
                "Scheduler(key_by='structure'): plans keyed by structure with sizes abstracted (so that "
                "decode step n+1 reuses step n's plan) are not built; plans are keyed by graph.digest")
        if key_by != "digest":
            raise ValueError(f"key_by must be 'digest' or 'structure', got {key_by!r}")
        self.config = SchedulerConfig(fuse, max_stages, stream_min_bytes, early_output_min_bytes)
        self.fusions = dict(FUSIONS if fusions is None else fusions)
        self._cache: LRU[str, ExecutionPlan] = LRU(cache_size)

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

    def key(self, graph: Graph, profile: WorkloadProfile) -> str:
        """The plan-cache key. ``graph.digest`` covers structure, shapes and weights."""
        fusions = ",".join(sorted(self.fusions))
        raw = f"{graph.digest}|r{profile.registry_version}|{self.config.fingerprint()}|{fusions}"
        return hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()

    def schedule(self, graph: Graph, profile: WorkloadProfile | None = None) -> ExecutionPlan:
        profile = profile if profile is not None else analyze(graph)
        if profile.digest != graph.digest:
            raise ValueError("schedule: the profile was computed for another graph "
                             f"(digest {profile.digest[:12]}, graph {graph.digest[:12]})")
        key = self.key(graph, profile)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        plan = self._schedule(graph, profile, key)
        self._cache.put(key, plan)
        return plan

    def cached(self, key: str) -> ExecutionPlan | None:
        """The plan cached under ``key`` (what a server looks up when a client sends only the key)."""
        return self._cache.peek(key)

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- the plan ------------------------------------------------------------------------------------
    def _schedule(self, src: Graph, profile: WorkloadProfile, key: str) -> ExecutionPlan:
        cfg = self.config
        calls, unfused = fusion_calls(src, profile, self.fusions) if cfg.fuse else ([], [])
        g, node_map = fuse(src, [c for c, _ in calls])
        groups = tuple(FusionGroup(c.kind, c.op, c.members, node_map[c.root], c.module, dict(m.info))
                       for c, m in calls)
        cost = graph_cost(g)
        last_use = _last_uses(g)
        kv_values = _kv_values(profile, node_map)
        out_ready = _output_ready(g)
        residency = _residency(g, kv_values)
        stage_of, bounds = _stages(g, cost.nodes, cfg, last_use, out_ready, residency)
        stages = _stage_records(g, bounds, stage_of, last_use, out_ready, residency, cost.nodes)
        uploads, downloads = _transfers(g, stages, stage_of, out_ready, residency)
        peak, total = _liveness(g, residency)
        weight_bytes = sum(t.nbytes for t in uploads if t.pinned)
        # large inputs follow the run in their own frames, first use first: early stages start
        # computing while they are still arriving
        stream = tuple(t.key for t in uploads if not t.pinned and t.nbytes >= cfg.stream_min_bytes)
        return ExecutionPlan(key, src.digest, g, tuple(node_map), profile.workload, profile.phase,
                             tuple(stages), groups, tuple(unfused), residency, uploads, downloads,
                             tuple(stage_of), last_use, peak, total, weight_bytes, stream)


@functools.cache  # one shared instance; a racing first call builds a spare, harmlessly
def default_scheduler() -> Scheduler:
    return Scheduler()


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


def _kv_values(profile: WorkloadProfile, node_map: list[int]) -> set[int]:
    """plan.graph ids of KV cache values: the past (if resident) and the updated cache."""
    out = set()
    for m in profile.by_kind("kv_cache_update"):
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


def _stages(g: Graph, costs, cfg: SchedulerConfig, last_use: dict[int, int], out_ready: list[int],
            residency: dict[int, Residency]) -> tuple[list[int], list[tuple[int, int]]]:
    compute = [n.id for n in g.nodes if n.op not in SOURCE_OPS]
    if not compute:
        return [0] * len(g.nodes), [(0, len(g.nodes))]
    first_use: dict[int, int] = {}
    ops = operands(g)
    for n in g.nodes:
        for r in ops[n.id]:
            first_use.setdefault(r.node, n.id)
    hard: set[int] = set()  # compute node ids that must start a stage: a large input arrives
    for n in g.nodes:
        if n.op == INPUT and n.outputs[0].nbytes >= cfg.stream_min_bytes and n.id in first_use:
            hard.add(first_use[n.id])
    early: set[int] = set()  # ... and should: a large output is final just before it
    pos = {nid: i for i, nid in enumerate(compute)}
    for i, r in enumerate(g.outputs):
        if residency.get(r.node) is Residency.OUTPUT and g.meta(r).nbytes >= cfg.early_output_min_bytes:
            p = pos.get(out_ready[i])
            if p is not None and p + 1 < len(compute):
                early.add(compute[p + 1])
    soft = {compute[i] for i in range(1, len(compute))
            if _block(g.nodes[compute[i]].module) != _block(g.nodes[compute[i - 1]].module)}
    hard.discard(compute[0])
    total = sum(costs[nid].flops for nid in compute) or 1
    target = total / cfg.max_stages
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
    starts = [s for i, s in enumerate(starts) if i == 0 or s in hard or flops[s] >= target / 2
              or i + 1 == len(starts)]
    # stage of each compute node; each source joins the stage of its first reader
    stage_of = [0] * len(g.nodes)
    k = -1
    start_set = set(starts)
    for nid in compute:
        if nid in start_set:
            k += 1
        stage_of[nid] = k
    for n in g.nodes:
        if n.op in SOURCE_OPS:
            stage_of[n.id] = stage_of[first_use[n.id]] if n.id in first_use else max(k, 0)
    bounds = []
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(g.nodes)
        bounds.append((s, end))
    return stage_of, bounds


def _stage_records(g: Graph, bounds, stage_of: list[int], last_use: dict[int, int], out_ready: list[int],
                   residency: dict[int, Residency], costs) -> list[Stage]:
    members: list[list[int]] = [[] for _ in bounds]
    for n in g.nodes:
        members[stage_of[n.id]].append(n.id)
    out_nodes = {r.node for r in g.outputs}
    ops = operands(g)
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
        frees = tuple(v for v, u in last_use.items() if stage_of[u] == k and v not in out_nodes
                      and residency.get(v) in (Residency.ACTIVATION, Residency.INPUT))
        stages.append(Stage(
            k, name, tuple(ids), needs,
            tuple(g.nodes[nid].args[0] for nid in ids if g.nodes[nid].op == INPUT),
            tuple(g.nodes[nid].args[0] for nid in ids if g.nodes[nid].op == CONST),
            ready, keep, tuple(sorted(frees)),
            tuple(nid for nid in compute if g.nodes[nid].op.startswith("genie.")),
            sum(costs[nid].flops for nid in compute), sum(costs[nid].bytes for nid in compute)))
    return stages


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


def _extent(m) -> int:
    if not m.shape or all(s > 0 for s in m.shape):
        span = 1 + sum((s - 1) * st for s, st in zip(m.shape, m.stride, strict=False)) if m.shape else 1
        return (m.offset + span) * m.dtype.itemsize
    return 0
