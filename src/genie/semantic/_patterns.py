"""The pattern registry: a table of (kind, form, pattern -> annotation). Rules are data.

Each built-in rule names what it finds (``kind``), which spelling of it (``form``), the structural
pattern (``Pat``, see ``_match``) and an annotator that turns the bound values into facts (heads,
causal, activation, ...) or rejects the match by returning None. Adding a spelling of attention is
one more row, not one more branch.

Matching walks the graph from the last node back. Within one kind a node belongs to at most one
match, so a sub-block is never counted twice; kinds may overlap (a residual add inside an MLP).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from genie.graph import Graph, Ref
from genie.semantic import _annotate as an
from genie.semantic._fold import Folder
from genie.semantic._match import Found, Pat, match
from genie.semantic._opsets import (
    ACT,
    ADD,
    ADDMM,
    BATCH_NORM,
    BMM,
    CAST,
    CAT,
    CONV,
    COPY,
    EMBEDDING,
    EMBEDDING_BAG,
    INDEX_COPY,
    LAYER_NORM,
    LINEAR,
    MASKED_FILL,
    MEAN,
    MHA,
    MM,
    NO_DATA,
    POW,
    RMS_NORM,
    RSQRT,
    SCALE,
    SDPA,
    SOFTMAX,
    SQRT,
    SUB,
    TRANSPOSE,
    UNSQUEEZE,
    VAR,
    VIEW,
    WHERE,
    ops,
)


@dataclass(frozen=True)
class MatchContext:
    """What an annotator may look at: the graph and a folder for constant values (masks, scales)."""

    graph: Graph
    folder: Folder


Annotate = Callable[[MatchContext, Found], "Mapping[str, Any] | None"]


@dataclass(frozen=True)
class Rule:
    kind: str  # what was found: "attention", "conv_bn_act", or a user's own kind
    form: str  # which spelling of it: "sdpa-decomposed", "eager", ...
    pattern: Pat
    annotate: Annotate | None = None


@dataclass(frozen=True)
class Match:
    """One found pattern. ``nodes`` are its member node ids; ``bindings`` name its input values."""

    kind: str
    form: str
    root: int
    nodes: tuple[int, ...]
    bindings: Mapping[str, Ref]
    info: Mapping[str, Any] = field(default_factory=dict)
    module: str = ""

    def __getitem__(self, key: str) -> Any:
        return self.info[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.info.get(key, default)

    def __str__(self) -> str:
        facts = ", ".join(f"{k}={v}" for k, v in self.info.items() if not isinstance(v, (Ref, tuple, dict)))
        where = f" @ {self.module}" if self.module else ""
        return f"{self.kind}[{self.form}] %{self.root} ({len(self.nodes)} nodes){where}: {facts}"


# -- the built-in patterns -------------------------------------------------------------------------
def _linear(x: Pat, name: str, weight: str = "") -> Pat:
    """addmm(bias, x, W) / mm(x, W) / linear(x, W, b), the value taken after its output reshape."""
    w = Pat(name=weight or f"{name}_w")
    return Pat.any(Pat(ADDMM, src=(None, x, w), name=name, through=VIEW),
                   Pat(MM, src=(x, w), name=name, through=VIEW),
                   Pat(LINEAR, src=(x, w), name=name, through=VIEW))


def _activation(h: Pat) -> Pat:
    """An activation of ``h``: one op, or tanh-/erf-GELU spelled out in elementwise ops."""
    half = Pat(SCALE, src=(h,))
    cube = Pat(POW, src=(h,))
    gelu_tanh = Pat(ops("mul.Tensor"), commutative=True, src=(
        half, Pat(ADD, src=(Pat(ops("tanh.default"), src=(Pat(SCALE, src=(Pat(ADD, commutative=True, src=(
            h, Pat(SCALE, src=(cube,)))),)),)),))))
    gelu_erf = Pat(ops("mul.Tensor"), commutative=True, src=(
        half, Pat(ADD, src=(Pat(ops("erf.default"), src=(Pat(SCALE, src=(h,)),)),))))
    return Pat.any(Pat(ACT, src=(h,), name="act"), gelu_tanh, gelu_erf)


def _attention() -> Pat:
    q = Pat(name="q", through=VIEW | SCALE, where=an.rank_3_or_4)
    k = Pat(TRANSPOSE, src=(Pat(name="k", through=VIEW | UNSQUEEZE, where=an.rank_3_or_4),),
            through=VIEW | SCALE, where=an.swaps_last_two)
    kt = Pat(name="kt", through=VIEW | SCALE, where=an.rank_3_or_4)  # k handed in already transposed
    qk = Pat(BMM, src=(q, Pat.any(k, kt)), name="qk", through=VIEW | SCALE | CAST)
    scores = Pat.any(
        Pat(ADD, src=(qk, Pat(name="mask")), commutative=True, through=VIEW | SCALE | CAST),
        Pat(MASKED_FILL, src=(qk, Pat(name="fill")), through=VIEW | SCALE | CAST),
        Pat(WHERE, src=(Pat(name="keep"), qk), through=VIEW | SCALE | CAST),
        qk)
    probs = Pat(SOFTMAX, src=(scores,), name="probs", through=VIEW | CAST)
    v = Pat(name="v", through=VIEW | UNSQUEEZE, where=an.rank_3_or_4)
    return Pat(VIEW, src=(Pat(BMM, src=(probs, v), name="pv"),), opt=True, name="out")


def _conv_bn_act() -> Pat:
    conv = Pat(CONV, src=(Pat(name="x"), Pat(name="w")), name="conv")
    bn = Pat(BATCH_NORM, src=(conv,), name="bn", out=0)
    return Pat(ACT, src=(bn,), name="act", opt=True)


def _mlp(gated: bool) -> Pat:
    x = Pat(name="x", through=VIEW)
    if gated:  # down(act(gate(x)) * up(x)): Llama, Mistral
        hidden = Pat(ops("mul.Tensor"), commutative=True,
                     src=(_activation(_linear(x, "fc1")), _linear(x, "up")))
    else:
        hidden = _activation(_linear(x, "fc1"))
    w = Pat(name="fc2_w")
    h = Pat(VIEW, src=(hidden,), opt=True)
    return Pat.any(Pat(ADDMM, src=(None, h, w), name="fc2"), Pat(MM, src=(h, w), name="fc2"),
                   Pat(LINEAR, src=(h, w), name="fc2"))


def _layernorm_decomposed() -> Pat:
    x = Pat(name="x")
    centered = Pat(SUB, src=(x, Pat(MEAN, src=(x,))))
    var = Pat.any(Pat(VAR, src=(x,)), Pat(MEAN, src=(Pat(POW, src=(centered,)),)))
    eps = Pat(ADD, src=(var,), opt=True)
    norm = Pat.any(Pat(ops("mul.Tensor"), src=(centered, Pat(RSQRT, src=(eps,))), commutative=True),
                   Pat(ops("div.Tensor"), src=(centered, Pat(SQRT, src=(eps,)))))
    scaled = Pat(ops("mul.Tensor"), src=(norm, Pat(name="weight")), commutative=True, opt=True)
    return Pat(ADD, src=(scaled, Pat(name="bias")), commutative=True, opt=True)


def _rmsnorm_decomposed() -> Pat:
    x = Pat(name="x", through=CAST)
    inv = Pat(RSQRT, src=(Pat(ADD, src=(Pat(MEAN, src=(Pat(POW, src=(x,)),)),), opt=True),))
    normed = Pat(ops("mul.Tensor"), src=(x, inv), commutative=True, through=CAST)
    return Pat(ops("mul.Tensor"), src=(normed, Pat(name="weight")), commutative=True, opt=True)


_persistent = an.lives_across_steps
BUILTIN_RULES: tuple[Rule, ...] = (
    Rule("attention", "sdpa-op", Pat(SDPA, src=(Pat(name="q"), Pat(name="k"), Pat(name="v")), out=0),
         an.attention_sdpa_op),
    Rule("attention", "mha-op", Pat(MHA, src=(Pat(name="q"),), out=0), an.attention_mha_op),
    Rule("attention", "matmul-softmax-matmul", _attention(), an.attention),
    Rule("conv_bn_act", "conv-bn-act", _conv_bn_act(), an.conv_bn_act),
    Rule("mlp", "gated", _mlp(gated=True), an.mlp),
    Rule("mlp", "linear-act-linear", _mlp(gated=False), an.mlp),
    Rule("layernorm", "op", Pat(LAYER_NORM, src=(Pat(name="x"),), out=0), an.norm),
    Rule("layernorm", "decomposed", _layernorm_decomposed(), an.norm),
    Rule("rmsnorm", "op", Pat(RMS_NORM, src=(Pat(name="x"),), out=0), an.norm),
    Rule("rmsnorm", "decomposed", _rmsnorm_decomposed(), an.norm),
    Rule("embedding", "embedding", Pat(EMBEDDING, src=(Pat(name="table"), Pat(name="indices"))),
         an.embedding),
    Rule("embedding_bag", "embedding_bag",
         Pat(EMBEDDING_BAG, src=(Pat(name="table"), Pat(name="indices")), out=0), an.embedding_bag),
    Rule("kv_cache_update", "cat", Pat(CAT, src=(Pat(name="past", where=an.cache_source), Pat(name="new"))),
         an.kv_cat),
    Rule("kv_cache_update", "index_copy",
         Pat(INDEX_COPY, src=(Pat(name="past", through=NO_DATA, where=_persistent),)), an.kv_index),
    Rule("kv_cache_update", "copy_into_slice",
         Pat(COPY, src=(Pat(name="past", through=NO_DATA, where=_persistent), Pat(name="new"))), an.kv_index),
    Rule("residual_add", "add", Pat(ADD, src=(Pat(name="skip"), Pat(name="branch")), commutative=True),
         an.residual),
)


def _common_module(mods: list[str]) -> str:
    """The longest dotted prefix shared by the non-empty module paths."""
    parts: list[str] | None = None
    for m in mods:
        if not m:
            continue
        other = m.split(".")
        if parts is None:
            parts = other
            continue
        i = 0
        while i < min(len(parts), len(other)) and parts[i] == other[i]:
            i += 1
        parts = parts[:i]
    return ".".join(parts or ())


# -- the registry ----------------------------------------------------------------------------------
class PatternRegistry:
    """An ordered table of rules; ``register`` adds your own. Earlier rules win within a kind.

    ``PatternRegistry()`` starts with the built-ins, ``PatternRegistry(builtins=False)`` empty.
    ``PatternRegistry.default()`` is the one ``genie.analyze`` uses.
    """

    _default: PatternRegistry | None = None
    _default_lock = threading.Lock()

    def __init__(self, rules: Iterable[Rule] = (), *, builtins: bool = True) -> None:
        self._rules: list[Rule] = [*(BUILTIN_RULES if builtins else ()), *rules]
        self.version = 0
        self._index: tuple[dict[str, list[Rule]], list[Rule]] | None = None

    @classmethod
    def default(cls) -> PatternRegistry:
        with cls._default_lock:
            if cls._default is None:
                cls._default = cls()
            return cls._default

    def register(self, kind: str, pattern: Pat, annotate: Annotate | None = None, *, form: str = "",
                 first: bool = False) -> Rule:
        """Add a rule; ``first=True`` puts it before the others (it then wins within its kind)."""
        if not isinstance(pattern, Pat):
            raise TypeError(f"register: pattern must be a genie.semantic.Pat, got {type(pattern).__name__}")
        rule = Rule(kind, form or kind, pattern, annotate)
        if first:
            self._rules.insert(0, rule)
        else:
            self._rules.append(rule)
        self.version += 1  # invalidates analyses cached under the old table
        self._index = None
        return rule

    def _rules_named(self, kind: str, form: str) -> list[Rule]:
        """The rules of ``kind`` spelt ``form``: how a cached plan finds the rule of its match."""
        return [r for r in self._rules if r.kind == kind and r.form == form]

    def _by_root_op(self) -> tuple[dict[str, list[Rule]], list[Rule]]:
        if self._index is None:
            by_op: dict[str, list[Rule]] = {}
            anywhere: list[Rule] = []
            for r in self._rules:
                root = r.pattern.root_ops()
                if root is None:
                    anywhere.append(r)
                else:
                    for op in root:
                        by_op.setdefault(op, []).append(r)
            order = {id(r): i for i, r in enumerate(self._rules)}
            for lst in by_op.values():  # keep table order when a rule is merged with wildcards
                lst.extend(anywhere)
                lst.sort(key=lambda r: order[id(r)])
            self._index = (by_op, anywhere)
        return self._index

    def match(self, graph: Graph, folder: Folder | None = None) -> tuple[Match, ...]:
        """Every match in ``graph``, in program order of their roots."""
        by_op, anywhere = self._by_root_op()
        ctx = MatchContext(graph, folder or Folder(graph))
        claimed: dict[str, set[int]] = {}
        found: list[Match] = []
        for n in reversed(graph.nodes):
            for rule in by_op.get(n.op, anywhere):
                taken = claimed.setdefault(rule.kind, set())
                if n.id in taken:
                    continue
                for f in match(rule.pattern, graph, n.id):
                    if not taken.isdisjoint(f.members):
                        continue
                    info = rule.annotate(ctx, f) if rule.annotate is not None else {}
                    if info is None:
                        continue
                    module = _common_module([graph.nodes[m].module for m in f.members]) or n.module
                    found.append(Match(rule.kind, rule.form, n.id, f.members, f.bindings, dict(info), module))
                    taken.update(f.members)
                    break
        found.reverse()
        return tuple(found)
