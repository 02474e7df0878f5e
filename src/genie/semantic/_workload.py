"""Workload classification: features counted from the matches, then a table of rules, first wins.

The evidence that decided is kept with the answer, so ``print(profile)`` says why a graph is an LLM.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence

from genie.graph import Graph
from genie.semantic._annotate import arg
from genie.semantic._opsets import CONV
from genie.semantic._patterns import Match


class WorkloadType(enum.Enum):
    LLM = "llm"
    VISION = "vision"
    MULTIMODAL = "multimodal"
    RECSYS = "recsys"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.name


Features = dict[str, int]

# (workload, test over the features, why): the first rule whose test passes decides.
WORKLOAD_RULES: tuple[tuple[WorkloadType, Callable[[Features], bool], str], ...] = (
    (WorkloadType.MULTIMODAL, lambda f: f["conv"] > 0 and f["token_embedding"] > 0 and f["attention"] > 0,
     "an image tower (convolutions) and a text tower (token embeddings feeding attention)"),
    (WorkloadType.RECSYS, lambda f: f["embedding_bag"] > 0 and f["attention"] == 0,
     "pooled sparse lookups (embedding_bag) and no attention"),
    (WorkloadType.LLM,
     lambda f: f["attention"] > 0 and (f["token_embedding"] > 0 or f["kv_cache_update"] > 0),
     "attention over token embeddings or a KV cache"),
    (WorkloadType.VISION, lambda f: f["conv"] > 0,
     "2-D convolutions over image tensors and no token embeddings"),
    (WorkloadType.RECSYS, lambda f: f["token_embedding"] >= 2 and f["attention"] == 0 and f["mlp"] > 0,
     "several sparse embedding tables feeding MLPs, no attention"),
)


def features(graph: Graph, matches: Sequence[Match]) -> Features:
    f: Features = {"attention": 0, "conv": 0, "patch_conv": 0, "token_embedding": 0, "position_embedding": 0,
                   "embedding_bag": 0, "kv_cache_update": 0, "mlp": 0, "conv_bn_act": 0}
    for m in matches:
        if m.kind == "embedding":
            f[f"{m.get('role', 'token')}_embedding"] += 1
        elif m.kind in f:
            f[m.kind] += 1
    for n in graph.nodes:
        if n.op in CONV and len(n.outputs[0].shape) == 4:
            f["conv"] += 1
            w = graph.meta(n.args[1]).shape
            if list(arg(n, "stride", [1])) == list(w[2:]) and w[2] > 1:  # ViT-style patchify
                f["patch_conv"] += 1
    return f


def classify(graph: Graph, matches: Sequence[Match]) -> tuple[WorkloadType, tuple[str, ...], Features]:
    f = features(graph, matches)
    for kind, test, why in WORKLOAD_RULES:
        if test(f):
            return kind, (f"rule: {why}", *_evidence(matches, f)), f
    return WorkloadType.UNKNOWN, ("rule: no workload rule matched", *_evidence(matches, f)), f


def _evidence(matches: Sequence[Match], f: Features) -> list[str]:
    out = []
    by_kind: dict[str, list[Match]] = {}
    for m in matches:
        key = f"{m.get('role')}_embedding" if m.kind == "embedding" else m.kind
        by_kind.setdefault(key, []).append(m)
    for key in ("attention", "token_embedding", "kv_cache_update", "conv_bn_act", "embedding_bag", "mlp"):
        ms = by_kind.get(key, [])
        if ms:
            where = ", ".join(dict.fromkeys(m.module or "?" for m in ms[:3]))
            where += ", ..." if len(ms) > 3 else ""
            out.append(f"{len(ms)} {key.replace('_', ' ')} ({where})")
    if f["conv"]:
        out.append(f"{f['conv']} conv2d" + (f" ({f['patch_conv']} patchify)" if f["patch_conv"] else ""))
    return out
