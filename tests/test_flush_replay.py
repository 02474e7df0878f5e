"""Device-mode flush replays (``genie.runtime``'s FLUSHES): a flush whose program was seen before
goes out from the remembered plan and template split, with no ``genie.compile`` and no code change.

Every test compares against eager PyTorch, and counts replays in ``genie.stats()``: a replay that
reused a plan for a program it does not fit would give another answer (or the counters would
show it missed where it must hit).
"""

from __future__ import annotations

import _server_fixtures as fx
import pytest
import torch
from _models import decode_gpt2, decode_llama

import genie
from genie.runtime import FLUSHES

server, remote, any_backend = fx.server, fx.remote, fx.any_backend  # fixtures, by name
DEV = "remote_accelerator:0"


@pytest.fixture(autouse=True)
def _fresh_replays():
    FLUSHES.clear()  # each test starts with no remembered program
    yield
    FLUSHES.clear()


def _replays() -> int:
    return genie.stats()["flush_replays"]


MODELS = {"gpt2": decode_gpt2, "llama": decode_llama}


@pytest.mark.parametrize("cache", ["static", None], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
@torch.no_grad()
def test_generate_in_device_mode_equals_eager(remote, name, cache):
    """``model.generate`` on a remote model, no genie.compile: eager's tokens; with a static cache
    every decode step after the first two is the same program, so the steps replay."""
    torch.manual_seed(2)
    ids = torch.randint(3, 128, (1, 6))
    kw = {"max_new_tokens": 10, "do_sample": False}
    if cache is not None:
        kw["cache_implementation"] = cache
    want = MODELS[name]().generate(ids, **kw).tolist()
    model = MODELS[name]().to(DEV)
    before = _replays()
    got = model.generate(ids.to(DEV), **kw).tolist()
    assert got == want
    assert len(set(got[0][6:])) > 1  # wide weights: the tokens move, a stale value would show
    if cache == "static":
        assert _replays() - before >= 6


@torch.no_grad()
def test_manual_static_loop_logits_equal_eager(remote):
    """A hand-written static-cache loop: each step's logits equal eager's, replayed or not."""
    from transformers import StaticCache

    torch.manual_seed(1)
    ids = torch.randint(3, 128, (1, 5))

    def loop(model, dev):
        cache = StaticCache(config=model.config, max_cache_len=32)
        out = model(ids.to(dev), past_key_values=cache, use_cache=True)
        logits = []
        for i in range(8):
            last = out.logits[:, -1]
            logits.append(last.cpu())
            pos = torch.tensor([ids.shape[1] + i]).to(dev)
            out = model(last.argmax(-1)[:, None], past_key_values=cache, use_cache=True, cache_position=pos)
        return logits

    want = loop(decode_gpt2(), "cpu")
    before = _replays()
    got = loop(decode_gpt2().to(DEV), DEV)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert _replays() - before >= 5


def test_a_new_constant_replays_with_its_own_value(any_backend):
    """The digest of a constant is a hole: a new value replays and is read, not the recorded one."""
    x = torch.arange(6.0).reshape(2, 3).to(DEV)
    before = _replays()
    for i in range(5):
        c = torch.full((2, 3), float(i) * 1.5)
        got = (x * c.to(DEV) + 1).cpu()
        torch.testing.assert_close(got, torch.arange(6.0).reshape(2, 3) * c + 1)
    assert _replays() - before >= 3


@pytest.mark.parametrize("values", [(2.0, 2.0, 2.0, 3.0, 2.0, 3.0), (0.0, 0.0, 0.0, -0.0, 0.0, -0.0),
                                    (1.0, 1.0, 1.0, 1, 1.0, 1)], ids=["float", "signed-zero", "types"])
@pytest.mark.parametrize("op", ["mul", "clamp"])
def test_a_changed_scalar_argument_misses_and_gives_eagers_answer(remote, values, op):
    """A Python scalar argument is part of the program: ``x * 3.0`` after ``x * 2.0`` (or ``-0.0``
    after ``0.0``, ``1`` after ``1.0``) never replays the other scalar's plan, and computes its own;
    a scalar seen before replays its own."""
    host = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    x = host.to(DEV)
    fn = (lambda t, s: t * s) if op == "mul" else (lambda t, s: t.clamp(min=s))
    seen: dict[tuple, int] = {}
    for s in values:
        replays = _replays()
        got = fn(x, s).cpu()
        want = fn(host, s)
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
        sights = seen[(type(s), repr(s))] = seen.get((type(s), repr(s)), 0) + 1
        if sights == 1:
            assert _replays() == replays  # never served by the plan of another scalar
        elif sights >= 3:
            assert _replays() == replays + 1  # its own plan, learnt at its second sight


def test_a_changed_shape_gives_eagers_answer(remote):
    """Sizes are holes in the template: a plan that is the graph itself replays at any size
    (``flush_replays_resized``), re-emitting only the nodes whose sizes moved; every size gives
    eager's answer."""
    before = genie.stats()
    for n in (3, 3, 3, 4, 3, 5, 6, 7):
        host = torch.arange(float(n * 2)).reshape(2, n)
        got = (host.to(DEV).softmax(-1) * 2).cpu()
        torch.testing.assert_close(got, host.softmax(-1) * 2)
    after = genie.stats()
    assert after["flush_replays_resized"] - before["flush_replays_resized"] >= 3  # 5, 6, 7 at least


def test_aliasing_and_in_place_writes_keep_their_meaning(any_backend):
    """Two programs that differ only in whether ``b`` is ``a`` or a copy of it: a remembered plan for
    one must never serve the other (the key holds the storages)."""
    host = torch.arange(4.0)
    base = host.to(DEV)
    for alias in (False, False, False, True, False, True, True, True):
        a = base.clone()
        b = a if alias else a.clone()
        a.add_(1)
        got = b.cpu()
        torch.testing.assert_close(got, host + 1 if alias else host)


def test_a_view_written_in_place_replays_right(any_backend):
    host = torch.zeros(3, 4)
    x = host.to(DEV)
    before = _replays()
    for row in (0, 0, 0, 1, 1, 1, 0):
        x[row].add_(2.0)  # an in-place write through a view of a resident value
        host[row].add_(2.0)
        torch.testing.assert_close(x.cpu(), host)
    assert _replays() - before >= 2


@torch.no_grad()
def test_an_attention_mask_constant_that_changes_is_never_folded_stale(remote):
    """Fusion facts (a mask that is all-visible or causal) may be folded from a constant's value.
    When such a constant changes, the remembered plan is not reused: each mask gives eager's
    attention."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    rq, rk, rv = (t.to(DEV) for t in (q, k, v))

    def attend(q, k, v, mask):
        s = (q @ k.transpose(-1, -2)) / 8 ** 0.5
        return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v

    full = torch.ones(4, 4, dtype=torch.bool)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    for mask in (full, full, full, causal, full, causal, causal):
        got = attend(rq, rk, rv, mask.to(DEV)).cpu()
        torch.testing.assert_close(got, attend(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_replays_show_in_stats(remote):
    x = torch.ones(8).to(DEV)
    before = genie.stats()
    for _ in range(6):
        assert (x * 3 + 1).sum().item() == 32.0
    after = genie.stats()
    assert after["flush_replays"] - before["flush_replays"] >= 4  # first sight, second (learnt), replays
    assert after["flush_replay_entries"] - before["flush_replay_entries"] >= 1
