"""Pattern counts on the graphs Genie really records, in each model's own spelling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from test_semantic_workload import captured

import genie
from genie.semantic import Pat, PatternRegistry, SemanticAnalyzer


def kinds(name: str) -> dict[str, int]:
    return genie.analyze(captured(name)).counts()


# -- attention ------------------------------------------------------------------------------------
def test_attention_one_per_layer_gpt2_sdpa_and_eager() -> None:
    for name in ("gpt2", "gpt2-eager"):  # 3 layers, 4 heads of 16
        ms = genie.analyze(captured(name)).by_kind("attention")
        assert [m.module for m in ms] == [f"transformer.h.{i}.attn" for i in range(3)], name
        for m in ms:
            assert (m["heads"], m["kv_heads"], m["head_dim"], m["q_len"], m["kv_len"]) == (4, 4, 16, 16, 16)
            assert m["causal"] and not m["masked"] and m["fusable"], m
            assert abs(m["scale"] - 0.25) < 1e-9


def test_attention_llama_gqa() -> None:
    ms = genie.analyze(captured("llama")).by_kind("attention")
    assert [m.module for m in ms] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for m in ms:
        assert (m["heads"], m["kv_heads"], m["head_dim"]) == (4, 2, 16)
        assert m["causal"] and m["fusable"]
        # k and v are bound before repeat_kv: the fused kernel does the grouping itself
        g = captured("llama")
        assert g.meta(m.bindings["k"]).shape[1] == 2


def test_attention_clip_towers_causal_only_in_text() -> None:
    ms = genie.analyze(captured("clip")).by_kind("attention")
    assert len(ms) == 4
    assert [m["causal"] for m in ms] == [False, False, True, True]
    assert all(m.module.startswith(("vision_model", "text_model")) for m in ms)


def test_attention_sdpa_op_and_explicit_masks() -> None:
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    with genie.capture():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: F841
    (m,) = genie.analyze(genie.get_graph()).by_kind("attention")
    assert m.form == "sdpa-op" and m["causal"] and m["fusable"]

    def explicit(q, k, v, mask):  # a hand-written attention with masked_fill and a division
        s = (q @ k.transpose(-2, -1)) / 4.0
        return torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1) @ v

    causal = torch.ones(8, 8, dtype=torch.bool).triu(1)
    (m,) = genie.analyze(genie.trace(lambda q, k, v: explicit(q, k, v, causal), q, k, v)).by_kind("attention")
    assert m["causal"] and m["scale"] == 0.25 and m["fusable"]
    # a mask that is data (an input) is still attention, but not fusable
    (m,) = genie.analyze(genie.trace(explicit, q, k, v, causal)).by_kind("attention")
    assert m["masked"] and not m["fusable"] and "mask" in m["why"]
    # a non-causal constant pattern: found, not fused
    band = torch.ones(8, 8, dtype=torch.bool).triu(3)
    (m,) = genie.analyze(genie.trace(lambda q, k, v: explicit(q, k, v, band), q, k, v)).by_kind("attention")
    assert m["masked"] and not m["fusable"]


# -- the other built-ins ---------------------------------------------------------------------------
def test_conv_bn_act_one_per_block() -> None:
    p = genie.analyze(captured("convnet"))
    assert [m.module for m in p.by_kind("conv_bn_act")] == ["features", "features"]
    ms = genie.analyze(captured("conv_blocks")).by_kind("conv_bn_act")
    assert [m.module for m in ms] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [m["activation"] for m in ms] == ["relu", "silu", "gelu"]
    assert [m["groups"] for m in ms] == [1, 1, 16]
    assert all(m["fusable"] for m in ms)


def test_mlp_norms_embeddings_residuals() -> None:
    gpt = kinds("gpt2")
    assert gpt["mlp"] == 3 and gpt["layernorm"] == 7 and gpt["residual_add"] == 6 and gpt["embedding"] == 2
    ll = genie.analyze(captured("llama"))
    assert [m.get("gated") for m in ll.by_kind("mlp")] == [True, True]
    assert len(ll.by_kind("rmsnorm")) == 5 and all(m.form == "decomposed" for m in ll.by_kind("rmsnorm"))
    roles = sorted(m["role"] for m in genie.analyze(captured("gpt2")).by_kind("embedding"))
    assert roles == ["position", "token"]
    bags = genie.analyze(captured("dlrm")).by_kind("embedding_bag")
    assert len(bags) == 3 and bags[0]["mode"] == "sum"
    assert kinds("dlrm")["mlp"] == 2  # bottom and top


def test_decomposed_layernorm_and_rmsnorm() -> None:
    x, w, b = torch.randn(4, 32), torch.randn(32), torch.randn(32)

    def ln(x):
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + 1e-5) * w + b

    def rms(x):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    (m,) = genie.analyze(genie.trace(ln, x)).by_kind("layernorm")
    assert m.form == "decomposed" and m["affine"]
    (m,) = genie.analyze(genie.trace(rms, x)).by_kind("rmsnorm")
    assert m.form == "decomposed" and m["affine"]


def test_kv_cache_updates() -> None:
    p = genie.analyze(captured("llama"))
    assert len(p.by_kind("kv_cache_update")) == 0  # use_cache=False: nothing lives on (decode: test_phase)
    past = torch.randn(1, 2, 10, 16)
    new = torch.randn(1, 2, 1, 16)

    def static_step(cache, new, pos):  # a static cache: written in place at the new position
        return cache.index_copy_(2, pos, new)

    (m,) = genie.analyze(genie.trace(static_step, past, new, torch.tensor([9]))).by_kind("kv_cache_update")
    assert m.form == "index_copy" and m["in_place"] and m["heads"] == 2
    (m,) = genie.analyze(genie.trace(lambda p, n: torch.cat([p, n], dim=-2), past, new)).by_kind(
        "kv_cache_update")
    assert (m.form, m["past_len"], m["new_len"], m["total_len"]) == ("cat", 10, 1, 11)


# -- user patterns ---------------------------------------------------------------------------------
def test_custom_pattern_is_found_and_defaults_are_untouched() -> None:
    h = Pat(name="h")  # GPT-2's tanh-GELU, spelled out: 0.5*h*(1 + tanh(c*(h + 0.044715*h^3)))
    inner = Pat("add.Tensor", src=(h, Pat("mul.Tensor", src=(Pat("pow.Tensor_Scalar", src=(h,)),))),
                commutative=True)
    gelu = Pat("mul.Tensor", commutative=True, src=(
        Pat("mul.Tensor", src=(h,)),
        Pat("add.Tensor", src=(Pat("tanh.default", src=(Pat("mul.Tensor", src=(inner,)),)),))))
    seen = []
    reg = PatternRegistry()
    reg.register("gelu_tanh", gelu, annotate=lambda ctx, f: seen.append(f.root) or {"width": ctx.graph.meta(
        f.bindings["h"]).shape[-1]})
    p = SemanticAnalyzer(reg).analyze(captured("gpt2"))
    ms = p.by_kind("gelu_tanh")
    assert [m.module for m in ms] == [f"transformer.h.{i}.mlp.act" for i in range(3)]
    assert all(m["width"] == 256 for m in ms) and len(seen) == 3
    assert "gelu_tanh" not in genie.analyze(captured("gpt2")).counts()  # the default registry
    # a chain shorthand, and rules without an annotator
    reg2 = PatternRegistry(builtins=False)
    reg2.register("softmax_then_bmm", Pat.seq("_safe_softmax.default", "expand.default", "view.default",
                                              "bmm.default"))
    assert SemanticAnalyzer(reg2).analyze(captured("gpt2")).counts() == {"softmax_then_bmm": 3}


def test_registering_invalidates_cached_analyses() -> None:
    reg = PatternRegistry()
    a = SemanticAnalyzer(reg)
    before = a.analyze(captured("convnet"))
    reg.register("pool", Pat("max_pool2d_with_indices.default", out=0))
    after = a.analyze(captured("convnet"))
    assert after is not before and after.counts()["pool"] == 1
