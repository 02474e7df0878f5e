"""HF accelerate over two remote devices (two embedded servers): a pipeline split by ``device_map``,
through ``dispatch_model`` and through ``from_pretrained``, gives eager's greedy tokens; the hidden
state crosses from server 0 to server 1 directly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from _server_fixtures import using

from genie.runtime import ServerSet

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)
D0, D1 = "remote_accelerator:0", "remote_accelerator:1"
# a pipeline split: embeddings and the first block on server 0, the rest on server 1
DEVICE_MAP = {"transformer.wte": D0, "transformer.wpe": D0, "transformer.drop": D0, "transformer.h.0": D0,
              "transformer.h.1": D1, "transformer.ln_f": D1, "lm_head": D1}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # untied: lm_head on server 1, the embedding it would share on server 0
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def two() -> Iterator[ServerSet]:
    with using(ServerSet.embedded(2)) as b:
        yield b


def _greedy(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=6, do_sample=False).cpu()


def test_dispatch_model_across_two_remote_devices_gives_eager_tokens(two):
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    want = _greedy(_model(), ids)
    model = accelerate.dispatch_model(_model(), device_map=DEVICE_MAP)
    assert model.transformer.h[0].attn.c_attn.weight.device == torch.device(D0)
    assert model.lm_head.weight.device == torch.device(D1)
    before = two.stats.extra["transfers"]
    assert torch.equal(_greedy(model, ids.to(D0)), want)
    assert two.stats.extra["transfers"] > before  # each step's hidden state went server to server


def test_from_pretrained_with_a_remote_device_map(two, tmp_path):
    """transformers kernelizes by default and its ``kernels`` library refuses devices it does not
    know; with ``use_kernels=False`` a remote device map loads and runs."""
    _model().save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    want = _greedy(_model(), ids)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, device_map=DEVICE_MAP, use_kernels=False)
    assert model.transformer.wte.weight.device == torch.device(D0)
    assert model.lm_head.weight.device == torch.device(D1)
    assert torch.equal(_greedy(model, ids.to(D0)), want)
