"""Greedy decode with ``model.forward = genie.compile(model.forward)`` equals eager: GPT-2 and Llama
(tiny configs, random weights), static and dynamic caches, in a manual loop and through ``generate``.

The weights are drawn wide (``initializer_range``) so that greedy tokens differ from step to step:
a replay that read a stale cache entry would change them.
"""

from __future__ import annotations

import _server_fixtures as fx
import pytest
import torch
from _models import decode_gpt2, decode_llama

import genie

server, remote = fx.server, fx.remote  # fixtures, by name
DEV = "remote_accelerator:0"


MODELS = {"gpt2": decode_gpt2, "llama": decode_llama}


def _loop(model, ids: torch.Tensor, static: bool, steps: int = 8,
          replayed: list | None = None) -> tuple[list[int], list[torch.Tensor]]:
    from transformers import StaticCache

    dev = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=32) if static else None
    out = model(ids.to(dev), past_key_values=cache, use_cache=True)
    cache = out.past_key_values
    tokens, logits = [], []
    for i in range(steps):
        last = out.logits[:, -1]
        tok = last.argmax(-1)
        tokens.append(int(tok.cpu()))
        logits.append(last.cpu())
        pos = torch.tensor([ids.shape[1] + i]).to(dev) if static else None
        cur = tok[:, None]
        before = genie.stats()
        out = model(cur, past_key_values=cache, use_cache=True, cache_position=pos)
        after = genie.stats()
        if replayed is not None:  # ops recorded and bytes sent by the call (the pending token's too)
            replayed.append((after["shape_cache_hits"] + after["shape_cache_misses"]
                             - before["shape_cache_hits"] - before["shape_cache_misses"],
                             after["bytes_sent"] - before["bytes_sent"]))
        assert out.past_key_values is cache  # the cache object itself comes back
    return tokens, logits


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
@torch.no_grad()
def test_manual_loop_equals_eager(remote, name, static):
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (1, 5))
    want, want_logits = _loop(MODELS[name](), ids, static)
    model = MODELS[name]().to(DEV)
    model.forward = genie.compile(model.forward)
    calls: list[tuple[int, int]] = []
    got, got_logits = _loop(model, ids, static, replayed=calls)
    assert got == want
    assert len(set(want)) > 1
    for a, b in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if static:  # prefill and the first decode step record; every later step replays
        assert model.forward.records == 2
        assert model.forward.replays == 7
        for ops, sent in calls[1:]:
            assert ops == 0  # nothing recorded per op
            assert sent <= 4096  # the pending token's flush and one replay frame
    else:  # the cache grows every step: never replayed, runs as device mode
        assert model.forward.replays == 0


@pytest.mark.parametrize("cache", ["static", None], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
@torch.no_grad()
def test_generate_equals_eager(remote, name, cache):
    torch.manual_seed(2)
    ids = torch.randint(3, 128, (1, 6))
    kw = {"max_new_tokens": 8, "do_sample": False}
    if cache is not None:
        kw["cache_implementation"] = cache
    want = MODELS[name]().generate(ids, **kw).tolist()
    model = MODELS[name]().to(DEV)
    model.forward = genie.compile(model.forward)
    got = model.generate(ids.to(DEV), **kw).tolist()
    assert got == want
    assert len(got[0]) == 6 + 8
    if cache == "static":
        assert model.forward.replays >= 5
