"""HF generation through Genie equals eager, with static and dynamic caches (issue 9, item 13).

A static cache is zero-filled per layer (equal bytes: distinct values all the same), allocated at
its first update, written in place with ``index_copy_`` and tracked by an in-place ``cumulative_length``:
every one of those writes must reach the right buffer, and none may be dropped.
"""

from __future__ import annotations

import _server_fixtures as fx
import pytest
import torch
from _models import gpt2

server, any_backend = fx.server, fx.any_backend  # fixtures, by name
DEV = "remote_accelerator:0"


def llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()



def _generate(model: torch.nn.Module, ids: torch.Tensor, cache: str | None) -> list[list[int]]:
    kw = {"max_new_tokens": 8, "do_sample": False}
    if cache is not None:
        kw["cache_implementation"] = cache
    with torch.no_grad():
        out = model.generate(ids, **kw)
    return out.tolist()


@pytest.mark.parametrize("cache", ["static", None])
def test_llama_generate_equals_eager(any_backend, cache):
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (1, 6))
    want = _generate(llama(), ids, cache)
    got = _generate(llama().to(DEV), ids.to(DEV), cache)
    assert got == want
    assert len(got[0]) == 6 + 8


@pytest.mark.parametrize("cache", ["static", None])
def test_gpt2_generate_equals_eager(any_backend, cache):
    torch.manual_seed(1)
    ids = torch.randint(1, 128, (1, 5))
    want = _generate(gpt2(), ids, cache)
    got = _generate(gpt2().to(DEV), ids.to(DEV), cache)
    assert got == want
