"""``analyze(graph) -> WorkloadProfile``: matches, workload, phase, module paths and cost.

Call tree::

    SemanticAnalyzer(registry).analyze(graph)      cached by (graph.digest, registry.version)
      registry.match(graph, Folder(graph))         the pattern table, from the last node back
      classify(graph, matches)                     workload + evidence (rule table in _workload)
      detect_phase(matches)                        prefill/decode from attention and cache lengths
      graph_cost(graph)                            FLOPs and bytes per node (table in _cost)
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

from genie.graph import Graph
from genie.semantic._cost import GraphCost, graph_cost
from genie.semantic._fold import Folder
from genie.semantic._lru import LRU
from genie.semantic._patterns import Match, PatternRegistry
from genie.semantic._phase import DECODE_MAX_QUERY, Phase, detect_phase
from genie.semantic._workload import Features, WorkloadType, classify


@dataclass(frozen=True, eq=False)
class WorkloadProfile:
    """What a graph means. Immutable; shared by every graph with the same digest."""

    digest: str
    workload: WorkloadType
    evidence: tuple[str, ...]
    features: Features
    matches: tuple[Match, ...]
    phase: Phase
    phase_evidence: dict
    modules: tuple[str, ...]  # module path of each node, by node id ("" outside any module)
    cost: GraphCost
    registry_version: int = 0
    _by_kind: dict[str, tuple[Match, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for m in self.matches:
            self._by_kind.setdefault(m.kind, ())
            self._by_kind[m.kind] += (m,)

    def by_kind(self, kind: str) -> tuple[Match, ...]:
        return self._by_kind.get(kind, ())

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self._by_kind.items()}

    def module_of(self, node_id: int) -> str:
        return self.modules[node_id]

    def __str__(self) -> str:
        phase = f" / {self.phase}" if self.phase is not Phase.NONE else ""
        lines = [f"WorkloadProfile {self.workload}{phase}  digest={self.digest[:12]}  "
                 f"{len(self.modules)} nodes, {self.cost}"]
        lines += [f"  evidence: {e}" for e in self.evidence]
        if self.phase_evidence:
            lines.append("  phase: " + ", ".join(f"{k}={v}" for k, v in self.phase_evidence.items()))
        counts = Counter(m.kind for m in self.matches)
        lines.append("  matches: " + ", ".join(f"{k} x{n}" for k, n in counts.items()))
        for m in self.matches:
            if m.kind in ("attention", "conv_bn_act", "kv_cache_update"):
                lines.append(f"    {m}")
        return "\n".join(lines)


class SemanticAnalyzer:
    """Pure and synchronous: a Graph in, a WorkloadProfile out. Thread-safe; results are cached."""

    def __init__(self, registry: PatternRegistry | None = None, *, decode_max_query: int = DECODE_MAX_QUERY,
                 cache_size: int = 128) -> None:
        self.registry = registry if registry is not None else PatternRegistry.default()
        self.decode_max_query = decode_max_query
        self._cache: LRU[tuple[str, int], WorkloadProfile] = LRU(cache_size)

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

    def analyze(self, graph: Graph) -> WorkloadProfile:
        key = (graph.digest, self.registry.version)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        profile = self._analyze(graph)
        self._cache.put(key, profile)
        return profile

    def _analyze(self, graph: Graph) -> WorkloadProfile:
        matches = self.registry.match(graph, Folder(graph))
        workload, evidence, feats = classify(graph, matches)
        phase, phase_ev = (detect_phase(matches, self.decode_max_query)
                           if workload in (WorkloadType.LLM, WorkloadType.MULTIMODAL) else (Phase.NONE, {}))
        return WorkloadProfile(graph.digest, workload, evidence, feats, matches, phase, phase_ev,
                               tuple(n.module for n in graph.nodes), graph_cost(graph),
                               self.registry.version)


@functools.cache  # one shared instance; a racing first call builds a spare, harmlessly
def default_analyzer() -> SemanticAnalyzer:
    return SemanticAnalyzer()


def analyze(graph: Graph, registry: PatternRegistry | None = None) -> WorkloadProfile:
    """What ``graph`` means: its workload, pattern matches, phase, module paths and cost."""
    if registry is not None:
        return SemanticAnalyzer(registry).analyze(graph)
    return default_analyzer().analyze(graph)
