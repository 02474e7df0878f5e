"""Workload classification on real architectures (small configs, random weights), plus the model
builders the other test_semantic_* files share."""

from __future__ import annotations

import functools

import pytest
import torch
from _models import convnet, gpt2
from torch import nn

import genie
from genie.semantic import Phase, WorkloadType


# -- models -------------------------------------------------------------------------------------------
def llama(n_layer: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=n_layer, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def clip() -> nn.Module:
    """Two towers: a patch-conv vision transformer and a causal text transformer."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=128, max_position_embeddings=16, **tower),
                     vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)
    return CLIPModel(cfg).eval()


class DLRM(nn.Module):
    """Sparse features through EmbeddingBag tables, dense ones through an MLP, then a top MLP."""

    def __init__(self, tables: int = 3, rows: int = 1000, dim: int = 16) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.EmbeddingBag(rows, dim, mode="sum") for _ in range(tables))
        self.bottom = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, dim))
        self.top = nn.Sequential(nn.Linear(dim * (tables + 1), 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, dense: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        feats = [self.bottom(dense)] + [t(idx[i], offsets) for i, t in enumerate(self.tables)]
        return torch.sigmoid(self.top(torch.cat(feats, dim=1)))


def dlrm() -> nn.Module:
    torch.manual_seed(0)
    return DLRM().eval()


class ConvBlocks(nn.Module):
    """Three conv-bn-act blocks in three spellings: in-place ReLU, no-bias + SiLU, depthwise + GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True)),
            nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                          nn.SiLU()),
            nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.GELU()),
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(dim=(2, 3)))


def conv_blocks() -> nn.Module:
    torch.manual_seed(0)
    net = ConvBlocks()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _gpt2_fwd(m):
    return lambda ids: m(ids, use_cache=False).logits


def _llama_fwd(m):
    return lambda ids: m(ids, use_cache=False).logits


BUILDERS = {  # name -> (model builder, example inputs, traced function of the model)
    "gpt2": (lambda: gpt2(3, "sdpa"), lambda: (torch.randint(0, 128, (2, 16)),), _gpt2_fwd),
    "gpt2-eager": (lambda: gpt2(3, "eager"), lambda: (torch.randint(0, 128, (2, 16)),), _gpt2_fwd),
    "llama": (llama, lambda: (torch.randint(0, 128, (1, 16)),), _llama_fwd),
    "convnet": (convnet, lambda: (torch.randn(2, 3, 16, 16),), lambda m: m),
    "conv_blocks": (conv_blocks, lambda: (torch.randn(2, 3, 16, 16),), lambda m: m),
    "clip": (clip, lambda: (torch.randint(0, 128, (2, 8)), torch.randn(2, 3, 32, 32)),
             lambda m: lambda ids, px: m(input_ids=ids, pixel_values=px).logits_per_image),
    "dlrm": (dlrm, lambda: (torch.randn(4, 8), torch.randint(0, 1000, (3, 12)), torch.tensor([0, 3, 6, 9])),
             lambda m: m),
}


@functools.cache
def model(name: str) -> nn.Module:
    return BUILDERS[name][0]()


@functools.cache
def example(name: str) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    return BUILDERS[name][1]()


@functools.cache
def captured(name: str) -> genie.Graph:
    """The graph ``genie.capture()`` records for one forward of the model."""
    fn, args = BUILDERS[name][2](model(name)), example(name)  # inputs made outside: graph inputs
    with genie.capture():
        out = fn(*args)  # noqa: F841 (a capture's outputs are its live tensors)
    return genie.get_graph()


@functools.cache
def traced(name: str) -> genie.Graph:
    """The same forward through ``genie.trace``: inputs by position, outputs explicit."""
    return genie.trace(BUILDERS[name][2](model(name)), *example(name))


# -- tests --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, workload", [
    ("gpt2", WorkloadType.LLM), ("gpt2-eager", WorkloadType.LLM), ("llama", WorkloadType.LLM),
    ("convnet", WorkloadType.VISION), ("conv_blocks", WorkloadType.VISION),
    ("clip", WorkloadType.MULTIMODAL), ("dlrm", WorkloadType.RECSYS),
])
def test_workload(name: str, workload: WorkloadType) -> None:
    profile = genie.analyze(captured(name))
    assert profile.workload is workload, str(profile)
    assert profile.evidence[0].startswith("rule: ")
    assert len(profile.evidence) >= 2  # the rule and the facts behind it


def test_evidence_names_the_modules() -> None:
    p = genie.analyze(captured("gpt2"))
    assert any("transformer.h.0.attn" in e and "attention" in e for e in p.evidence)
    assert any("token embedding (transformer.wte)" in e for e in p.evidence)
    clip_p = genie.analyze(captured("clip"))
    assert any("patchify" in e for e in clip_p.evidence)
    assert any("text_model.embeddings.token_embedding" in e for e in clip_p.evidence)


def test_module_paths_recorded_per_node() -> None:
    g = captured("gpt2")
    p = genie.analyze(g)
    assert len(p.modules) == len(g.nodes)
    assert "transformer.h.0.attn" in p.modules and "transformer.h.2.mlp.c_fc" in p.modules
    for m in p.by_kind("attention"):
        assert m.module.startswith("transformer.h.") and m.module.endswith(".attn")
        assert p.module_of(m.root) == m.module


def test_cost_counts_matmul_flops() -> None:
    g = captured("gpt2")
    p = genie.analyze(g)
    assert p.cost.flops == sum(c.flops for c in p.cost.nodes) and len(p.cost.nodes) == len(g.nodes)
    for n in g.nodes:
        if n.op == "aten.addmm.default":  # (M, K) @ (K, N): 2*M*N*K plus the bias
            (m, k), (_, cols) = g.meta(n.args[1]).shape, g.meta(n.args[2]).shape
            assert p.cost.of(n.id).flops == 2 * m * cols * k
        if n.op in ("aten.view.default", "aten.transpose.int", "genie.const"):
            assert p.cost.of(n.id).bytes == 0
    # one token per position: the embedding gathers rows, it does not read the table
    emb = next(n for n in g.nodes if n.op == "aten.embedding.default")
    assert p.cost.of(emb.id).bytes < g.meta(emb.args[0]).nbytes


def test_non_llm_has_no_phase() -> None:
    assert genie.analyze(captured("convnet")).phase is Phase.NONE
    assert genie.analyze(captured("gpt2")).phase is Phase.PREFILL


def test_profile_is_cached_by_digest() -> None:
    a = genie.SemanticAnalyzer()
    g1 = captured("convnet")
    x = example("convnet")[0]
    with genie.capture():
        out = model("convnet")(x)  # noqa: F841
    g2 = genie.get_graph()
    assert g2 is not g1 and g2.digest == g1.digest
    assert a.analyze(g1) is a.analyze(g2) and a.hits == 1
