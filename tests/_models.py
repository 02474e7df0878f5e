"""Small real architectures with random weights (no downloads)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

LLM_SERVER_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "llm_server.py"


def gpt2(n_layer: int = 2, attn: str = "sdpa") -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = attn
    return GPT2LMHeadModel(cfg).eval()


def decode_gpt2() -> nn.Module:
    """GPT-2 for greedy-decode tests: weights drawn wide (``initializer_range``), so that greedy
    tokens differ from step to step and a replay that read a stale cache entry would change them;
    no eos, so ``generate`` runs its full length."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, initializer_range=0.3,
                     bos_token_id=0, eos_token_id=None)
    return GPT2LMHeadModel(cfg).eval()


def decode_llama() -> nn.Module:
    """Llama (grouped-query attention) for greedy-decode tests, as ``decode_gpt2``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.3, bos_token_id=1, eos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                     vocab_size=128, max_position_embeddings=64)
    return BertModel(cfg).eval()


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def convnet() -> nn.Module:
    torch.manual_seed(0)
    net = ConvNet()
    for m in net.modules():  # non-trivial running stats so the BN fold is actually tested
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def llm_server_example():
    """``examples/llm_server.py`` as a module (its ``build_model`` and friends)."""
    spec = importlib.util.spec_from_file_location("llm_server_example", LLM_SERVER_EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt``, eagerly, recomputing the whole prefix each step."""
    ids, out = torch.tensor([prompt]), []
    for _ in range(n):
        t = int(model(ids).logits[0, -1].argmax())
        out.append(t)
        ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return out
