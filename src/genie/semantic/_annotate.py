"""Annotators: from a structural match to facts (heads, causal, activation, ...), or None to reject.

Each takes ``(ctx, found)``: ``ctx.graph``, ``ctx.folder`` (constant values), and the match's
bindings and members. They check what structure alone cannot (shapes agree, the mask is causal,
the scale is a constant) and say whether the match may be fused, and if not, why.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from genie.graph import CONST, INPUT, RESIDENT, SOURCE_OPS, Graph, Node, Ref, resolve_op
from genie.semantic._match import operands
from genie.semantic._opsets import (
    ADDMM,
    BMM,
    CONV,
    FUSABLE_ACT,
    LINEAR,
    MM,
    SCALE,
    UNSQUEEZE,
    ops,
)

if TYPE_CHECKING:
    from genie.semantic._match import Found
    from genie.semantic._patterns import MatchContext

Info = dict[str, Any]
MASKED = -1e4  # an additive mask value at or below this is "masked out" (finfo.min, -inf, -1e4)
HEAVY = BMM | MM | ADDMM | LINEAR | CONV | ops("embedding.default", "baddbmm.default")


# -- small helpers --------------------------------------------------------------------------------
@lru_cache(maxsize=512)
def _arg_names(op: str) -> tuple[str, ...]:
    return tuple(a.name for a in resolve_op(op)._schema.arguments)


def arg(node: Node, name: str, default: Any = None) -> Any:
    """An argument of an aten node by schema name, wherever it was passed."""
    if name in node.kwargs:
        return node.kwargs[name]
    names = _arg_names(node.op)
    i = names.index(name)
    return node.args[i] if i < len(node.args) else default


def rank_3_or_4(g: Graph, node: Node, ref: Ref) -> bool:
    return len(g.meta(ref).shape) in (3, 4)


def swaps_last_two(g: Graph, node: Node, ref: Ref) -> bool:
    nd = len(g.meta(ref).shape)
    if node.op == "aten.t.default":
        return nd == 2
    if node.op == "aten.transpose.int":
        return {node.args[1] % nd, node.args[2] % nd} == {nd - 1, nd - 2}
    if node.op == "aten.permute.default":
        perm = [d % nd for d in node.args[1]]
        return perm == [*range(nd - 2), nd - 1, nd - 2]
    return False


def lives_across_steps(g: Graph, node: Node, ref: Ref) -> bool:
    """A value bound from outside the run: it existed before this step and may outlive it."""
    return node.op in (RESIDENT, INPUT)


def cache_source(g: Graph, node: Node, ref: Ref) -> bool:
    """A KV cache before the update: resident/input, or the empty tensor a fresh cache starts from."""
    return node.op in (RESIDENT, INPUT) or (node.op == CONST and g.meta(ref).numel == 0)


def index_role(g: Graph, ref: Ref, limit: int = 256) -> str:
    """'token' for indices read from an input or resident (or drawn at random), 'position' for
    indices built from ``arange`` alone."""
    seen, todo, arange = set(), [ref.node], False
    while todo and len(seen) < limit:
        nid = todo.pop()
        if nid in seen:
            continue
        seen.add(nid)
        n = g.nodes[nid]
        if n.op in (INPUT, RESIDENT):
            return "token"
        arange = arange or n.op.startswith("aten.arange")
        todo.extend(r.node for r in operands(g)[nid])
    return "position" if arange else "token"


def _scale_of(ctx: MatchContext, members: tuple[int, ...]) -> float | None:
    """The product of the scalar multiplies/divides among ``members`` (None if one is not constant)."""
    g, scale = ctx.graph, 1.0
    for m in members:
        n = g.nodes[m]
        if n.op not in SCALE:
            continue
        factor = None
        for a in n.args[:2]:
            if isinstance(a, (int, float)) and not isinstance(a, bool):
                factor = float(a)
            elif type(a) is Ref and g.meta(a).shape == ():
                factor = ctx.folder.scalar(a)
                if factor is None:
                    return None
        if factor is None:
            return None
        scale *= 1.0 / factor if n.op.startswith("aten.div") else factor
    return scale


def _causal(q_len: int, k_len: int) -> torch.Tensor:
    """Bottom-right aligned causal pattern, as genie.kernels.attention(causal=True) uses."""
    return torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=k_len - q_len)


def classify_mask(allowed: torch.Tensor | None, q_len: int, k_len: int) -> str:
    """'none' (all visible), 'causal', 'other' (some other pattern) or 'unknown' (not constant)."""
    if allowed is None:
        return "unknown"
    try:
        allowed = torch.broadcast_to(allowed, (*allowed.shape[:-2], q_len, k_len)).reshape(-1, q_len, k_len)
    except RuntimeError:
        return "other"
    if bool(allowed.all()):
        return "none"
    return "causal" if bool((allowed == _causal(q_len, k_len)).all()) else "other"


def mask_kind(ctx: MatchContext, found: Found, q_len: int, k_len: int) -> str:
    """The mask of an attention match: 'none', 'causal', 'other' or 'unknown' (not constant)."""
    b, f = found.bindings, ctx.folder
    if "mask" in b:  # additive: 0 where visible, very negative where masked
        t = f.value(b["mask"])
        if t is None:
            return "unknown"
        if t.dtype == torch.bool:
            return classify_mask(t, q_len, k_len)
        t = t.float()
        ok = t == 0
        if not bool((ok | (t <= MASKED)).all()):
            return "other"  # a bias (ALiBi, relative positions), not a mask
        return classify_mask(ok, q_len, k_len)
    for name, masked_when in (("fill", True), ("keep", False)):  # masked_fill(s, c, v) / where(c, s, v)
        if name in b:
            node = _user_in(ctx.graph, b[name], found.members)
            value = f.scalar(node.args[2]) if node is not None and len(node.args) > 2 else None
            cond = f.value(b[name])
            if value is None or value > MASKED or cond is None:
                return "unknown"
            return classify_mask(~cond.bool() if masked_when else cond.bool(), q_len, k_len)
    return "none"


def _user_in(g: Graph, ref: Ref, members: tuple[int, ...]) -> Node | None:
    for u in g.users[ref.node]:
        if u in members:
            return g.nodes[u]
    return None


def _members_reading(g: Graph, ref: Ref, members: tuple[int, ...], op_set: frozenset[str]) -> bool:
    return any(g.nodes[u].op in op_set for u in g.users[ref.node] if u in members)


# -- attention --------------------------------------------------------------------------------------
def attention(ctx: MatchContext, found: Found) -> Info | None:
    g, b = ctx.graph, found.bindings
    qk, pv, out = g.meta(b["qk"]), g.meta(b["pv"]), g.meta(Ref(found.root, 0))
    q_len, k_len = qk.shape[-2], qk.shape[-1]
    qm, vm = g.meta(b["q"]), g.meta(b["v"])
    info: Info = {"q_len": q_len, "kv_len": k_len, "head_dim": qm.shape[-1], "heads": None,
                  "kv_heads": None, "batch": None, "causal": False, "masked": False, "scale": None,
                  "fusable": False, "why": ""}
    if qm.shape[-2] != q_len or qm.shape[-1] != pv.shape[-1] or vm.shape[-2] != k_len:
        return None  # bound the wrong tensors: not attention as this rule knows it
    mask = mask_kind(ctx, found, q_len, k_len)
    info["causal"] = mask == "causal"
    info["masked"] = mask in ("other", "unknown")
    info["scale"] = _scale_of(ctx, found.members)
    probs = g.nodes[b["probs"].node]
    dim = probs.args[1] if len(probs.args) > 1 else probs.kwargs.get("dim", -1)
    if dim not in (-1, len(g.meta(b["probs"]).shape) - 1):
        return None
    if "k" not in b:
        return {**info, "why": "k arrives already transposed"}
    km = g.meta(b["k"])
    if len(qm.shape) != 4 or len(km.shape) != 4 or len(vm.shape) != 4 or len(out.shape) != 4:
        return {**info, "why": "3-D operands (batch and heads merged)"}
    (bq, h, _, d), (bk, hk, sk, dk) = qm.shape, km.shape
    if bk != bq or sk != k_len or dk != d or vm.shape != km.shape or out.shape != (bq, h, q_len, d) \
            or hk == 0 or h % hk or qk.shape[0] != bq * h:
        return None
    if hk != h and not (_members_reading(g, b["k"], found.members, UNSQUEEZE)
                        and _members_reading(g, b["v"], found.members, UNSQUEEZE)):
        return None  # fewer kv heads must come with the repeat_kv idiom (unsqueeze, expand, view)
    info.update(batch=bq, heads=h, kv_heads=hk, head_dim=d)
    dtypes = {qm.dtype, km.dtype, vm.dtype, out.dtype}
    why = ("mask is not causal or constant" if info["masked"]
           else "scale is not a constant" if info["scale"] is None
           else "mixed dtypes" if len(dtypes) != 1
           else "")
    return {**info, "fusable": not why, "why": why}


def attention_sdpa_op(ctx: MatchContext, found: Found) -> Info | None:
    g, b = ctx.graph, found.bindings
    node = g.nodes[found.root]
    qm, km = g.meta(b["q"]), g.meta(b["k"])
    if len(qm.shape) != 4 or len(km.shape) != 4:
        return None
    names = _arg_names(node.op)
    mask = arg(node, "attn_mask") if "attn_mask" in names else arg(node, "attn_bias") \
        if "attn_bias" in names else None
    dropout = arg(node, "dropout_p", 0.0) if "dropout_p" in names else 0.0
    causal = bool(arg(node, "is_causal", False)) if "is_causal" in names else False
    scale = arg(node, "scale") if "scale" in names else None
    # torch aligns is_causal's mask top-left, genie.kernels bottom-right: they agree only when q_len
    # == kv_len (a decode step with q_len 1 and is_causal=True sees only the first key)
    why = ("explicit attention mask" if mask is not None else "dropout" if dropout else
           "enable_gqa" if "enable_gqa" in names and arg(node, "enable_gqa", False) else
           "is_causal with q_len != kv_len (torch aligns the mask top-left)"
           if causal and qm.shape[2] != km.shape[2] else "")
    return {"q_len": qm.shape[2], "kv_len": km.shape[2], "head_dim": qm.shape[3], "heads": qm.shape[1],
            "kv_heads": km.shape[1], "batch": qm.shape[0], "causal": causal, "masked": mask is not None,
            "scale": None if scale is None else float(scale), "fusable": not why, "why": why}


def attention_mha_op(ctx: MatchContext, found: Found) -> Info | None:
    node = ctx.graph.nodes[found.root]
    q = ctx.graph.meta(found.bindings["q"])
    heads, embed = int(arg(node, "num_head")), int(arg(node, "embed_dim"))
    return {"q_len": q.shape[-2], "kv_len": ctx.graph.meta(node.args[1]).shape[-2] if type(node.args[1])
            is Ref else q.shape[-2], "head_dim": embed // heads, "heads": heads, "kv_heads": heads,
            "batch": q.shape[0] if len(q.shape) == 3 else 1, "causal": False,
            "masked": arg(node, "mask") is not None, "scale": None, "fusable": False,
            "why": "nn.MultiheadAttention fast path (projections inside the op)"}


# -- conv -> batchnorm -> activation ----------------------------------------------------------------
def conv_bn_act(ctx: MatchContext, found: Found) -> Info | None:
    g, b = ctx.graph, found.bindings
    conv, bn = g.nodes[b["conv"].node], g.nodes[b["bn"].node]
    act = g.nodes[b["act"].node] if "act" in b else None
    w = g.meta(b["w"])
    if conv.op == "aten.convolution.default":
        transposed, groups = bool(conv.args[6]), int(conv.args[8])
        out_pad = list(conv.args[7])
    else:
        transposed, groups, out_pad = False, int(arg(conv, "groups", 1)), [0]
    stride, padding, dilation = (list(arg(conv, n, d)) for n, d in (("stride", [1]), ("padding", [0]),
                                                                    ("dilation", [1])))
    training = bool(arg(bn, "training", False)) if "training" in _arg_names(bn.op) else False
    eps = float(arg(bn, "eps"))
    activation = None
    if act is not None:
        activation = FUSABLE_ACT.get(act.op, act.op.split(".")[1].rstrip("_"))
        if activation == "gelu" and arg(act, "approximate", "none") != "none":
            activation = "gelu_tanh"
    c_in = g.meta(b["x"]).shape[1] if len(g.meta(b["x"]).shape) == 4 else None
    depthwise = groups > 1 and groups == c_in and w.shape[1] == 1 and w.shape[0] % groups == 0
    why = ("not a 2-D convolution" if len(w.shape) != 4 else "transposed convolution" if transposed
           else "output padding" if any(out_pad) else "batchnorm in training mode" if training
           else "no running statistics" if type(arg(bn, "running_mean")) is not Ref
           else f"groups={groups}" if groups > 1 and not depthwise
           else f"activation {activation}" if activation not in (None, "relu", "gelu", "silu") else "")
    return {"in_channels": w.shape[1] * groups, "out_channels": w.shape[0], "kernel": tuple(w.shape[2:]),
            "stride": tuple(stride), "padding": tuple(padding), "dilation": tuple(dilation),
            "groups": groups, "activation": activation, "eps": eps, "fusable": not why, "why": why}


# -- MLP, norms, embeddings ---------------------------------------------------------------------------
def mlp(ctx: MatchContext, found: Found) -> Info | None:
    g, b = ctx.graph, found.bindings
    act = g.nodes[b["act"].node].op.split(".")[1] if "act" in b else "gelu(decomposed)"
    fc1 = g.meta(b["fc1"])
    fc2 = g.meta(b["fc2"])
    return {"hidden": fc1.shape[-1], "out": fc2.shape[-1], "activation": act, "gated": "up" in b}


def norm(ctx: MatchContext, found: Found) -> Info | None:
    g, b = ctx.graph, found.bindings
    x = g.meta(b["x"])
    if not x.dtype.is_floating_point or not x.shape:
        return None
    return {"dim": x.shape[-1], "affine": "weight" in b or g.nodes[found.root].op.startswith(
        ("aten.native_layer_norm", "aten.layer_norm", "aten.rms_norm", "aten._fused_rms_norm"))}


def embedding(ctx: MatchContext, found: Found) -> Info | None:
    g, b = ctx.graph, found.bindings
    table = g.meta(b["table"])
    if len(table.shape) != 2:
        return None
    role = index_role(g, b["indices"])
    return {"vocab": table.shape[0], "dim": table.shape[1], "role": role,
            "weight": g.nodes[b["table"].node].op == CONST}


def embedding_bag(ctx: MatchContext, found: Found) -> Info | None:
    g, b = ctx.graph, found.bindings
    node = g.nodes[found.root]
    table = g.meta(b["table"])
    mode = {0: "sum", 1: "mean", 2: "max"}.get(arg(node, "mode", 0) if len(node.args) > 4 else 0, "?")
    return {"rows": table.shape[0], "dim": table.shape[1], "mode": mode,
            "lookups": g.meta(b["indices"]).numel}


# -- KV cache ---------------------------------------------------------------------------------------
def kv_cat(ctx: MatchContext, found: Found) -> Info | None:
    g, b = ctx.graph, found.bindings
    node = g.nodes[found.root]
    refs = operands(g)[found.root]
    out = g.meta(Ref(found.root, 0))
    if len(refs) != 2 or len(out.shape) < 3:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    seq_dim = dim % len(out.shape)
    past_node = g.nodes[b["past"].node]
    past = g.meta(b["past"])
    if past_node.op == CONST and Ref(found.root, 0) not in g.outputs:
        return None  # an empty constant only starts a cache if the result lives on
    past_len = past.shape[seq_dim] if past.numel else 0
    return {"seq_dim": seq_dim, "past_len": past_len, "new_len": g.meta(b["new"]).shape[seq_dim],
            "total_len": out.shape[seq_dim], "heads": out.shape[1] if len(out.shape) == 4 else None,
            "source": past_node.op, "in_place": False}


def kv_index(ctx: MatchContext, found: Found) -> Info | None:
    g, b = ctx.graph, found.bindings
    past = g.meta(b["past"])
    refs = operands(g)[found.root]
    new = g.meta(refs[-1]) if len(refs) > 1 else None
    if len(past.shape) < 3 or new is None or new.numel >= past.numel:
        return None
    seq_dim = 2 if len(past.shape) == 4 else len(past.shape) - 2
    return {"seq_dim": seq_dim, "past_len": None, "new_len": new.shape[seq_dim] if len(new.shape) ==
            len(past.shape) else None, "total_len": past.shape[seq_dim], "heads": past.shape[1],
            "source": g.nodes[b["past"].node].op, "in_place": True}


# -- residual add -------------------------------------------------------------------------------------
def residual(ctx: MatchContext, found: Found, window: int = 4096) -> Info | None:
    """x + F(x) where F holds a matmul/conv: ``skip`` is an ancestor of ``branch`` through one."""
    g, b = ctx.graph, found.bindings
    skip, branch = b["skip"], b["branch"]
    node = g.nodes[found.root]
    sm, bm = g.meta(skip), g.meta(branch)
    if sm.shape != bm.shape or not sm.dtype.is_floating_point or len(sm.shape) < 2 or skip == branch:
        return None
    if node.kwargs.get("alpha", 1) != 1 or g.nodes[skip.node].op in SOURCE_OPS:
        return None
    lo = skip.node
    if branch.node <= lo or branch.node - lo > window:
        return None
    # nodes on some path skip -> branch: reachable forward from skip and backward from branch
    fwd = _reach(g, lo, branch.node, forward=True)
    if branch.node not in fwd:
        return None
    back = _reach(g, branch.node, lo, forward=False)
    on_path = fwd & back
    if not any(g.nodes[n].op in HEAVY for n in on_path):
        return None
    return {"dim": sm.shape[-1], "depth": len(on_path)}


def _reach(g: Graph, start: int, bound: int, *, forward: bool) -> set[int]:
    seen = {start}
    todo = deque([start])
    ops = operands(g)
    while todo:
        n = todo.popleft()
        nxt = g.users[n] if forward else [r.node for r in ops[n]]
        for m in nxt:
            if m not in seen and (m <= bound if forward else m >= bound):
                seen.add(m)
                todo.append(m)
    return seen

