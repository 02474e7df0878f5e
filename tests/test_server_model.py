"""Models through a real ``genie serve``: results, decode residency, bytes per step, weights once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import _server_fixtures as fx
import pytest
import torch
from _server_fixtures import stats_delta, using

import genie
from genie.runtime._remote import RemoteBackend

server, remote = fx.server, fx.remote  # fixtures, by name

transformers = pytest.importorskip("transformers")
DEVICE = "remote_accelerator:0"
STEPS = 16


@torch.no_grad()
def tiny_gpt2() -> torch.nn.Module:
    """Random weights, the matrices scaled up so that greedy decoding does not repeat one token."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
    transformers.logging.set_verbosity_error()
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "wte" not in name:
            p.normal_(0, 0.2, generator=g)
    return model


def greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int, device: str | None = None,
           on_step=None) -> list[int]:
    past, cur, out = None, ids if device is None else ids.to(device), []
    for i in range(steps):
        o = model(cur, past_key_values=past, use_cache=True)
        past = o.past_key_values
        tok = o.logits[0, -1].argmax().item()
        if on_step is not None:
            on_step(i)
        out.append(tok)
        cur = torch.tensor([[tok]])
        if device is not None:
            cur = cur.to(device)
    return out


PROMPT = torch.tensor([[5, 99, 23, 42, 7, 64, 3, 120]])


@torch.no_grad()
def test_gpt2_forward_matches_eager(remote):
    model = tiny_gpt2()
    want = model(PROMPT).logits
    got = model.to(DEVICE)(PROMPT.to(DEVICE)).logits.cpu()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    s = genie.stats()
    assert s["runs"] >= 1 and s["bytes_sent"] > 0 and s["bytes_received"] > 0


@torch.no_grad()
def test_gpt2_greedy_decode_same_tokens_and_small_steps(remote):
    model = tiny_gpt2()
    want = greedy(model, PROMPT, STEPS)
    per_step: list[dict] = []
    last = [genie.stats()]

    def on_step(i: int) -> None:
        now = genie.stats()
        per_step.append(stats_delta(last[0], now))
        last[0] = now

    got = greedy(model.to(DEVICE), PROMPT, STEPS, DEVICE, on_step)
    assert got == want and len(set(want)) > 4
    # the KV cache stayed on the server: from step 2 on, each step is one plan-cache hit and one
    # round trip, with the token fetched by .item() and a few hundred bytes each way
    for i, d in enumerate(per_step[2:], start=2):
        assert d["template_hits"] == 1, (i, d)
        assert d["round_trips"] == 1, (i, d)
        assert d["bytes_sent"] + d["bytes_received"] <= 4096, (i, d)
        assert d["upload_bytes"] <= 64, (i, d)


@torch.no_grad()
def test_naive_mode_resends_weights_every_step(server):
    model = tiny_gpt2()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    want = greedy(model, PROMPT, 4)
    with using(RemoteBackend(server.address, server.token, residency=False)):
        per_step: list[dict] = []
        last = [genie.stats()]

        def on_step(i: int) -> None:
            now = genie.stats()
            per_step.append(stats_delta(last[0], now))
            last[0] = now

        got = greedy(model.to(DEVICE), PROMPT, 4, DEVICE, on_step)
    assert got == want
    for d in per_step[1:]:
        assert d["template_hits"] == 0
        # equal weights (LayerNorm ones, zero biases) share a digest, so a little less than all
        assert d["bytes_sent"] > 0.5 * weight_bytes


SECOND_CLIENT = textwrap.dedent("""
    import json, os, sys, torch, genie
    torch.manual_seed(1)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512))
    genie.connect(os.environ["ADDR"], token=os.environ["TOKEN"])
    with torch.no_grad():
        y = model.to("remote_accelerator:0")(torch.ones(4, 512).to("remote_accelerator:0")).cpu()
    print(json.dumps({"stats": genie.stats(), "sum": float(y.sum())}))
""")


@torch.no_grad()
def test_weights_upload_once_per_server(server):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    want = model(torch.ones(4, 512))
    with using(RemoteBackend(server.address, server.token)):
        got = model.to(DEVICE)(torch.ones(4, 512).to(DEVICE)).cpu()
        first = genie.stats()
    torch.testing.assert_close(got, want)
    assert first["bytes_sent"] > weight_bytes
    env = {**os.environ, "ADDR": server.address, "TOKEN": server.token, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SECOND_CLIENT], env=env, capture_output=True, timeout=120,
                         check=True)
    second = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert abs(second["sum"] - float(want.sum())) < 1e-3
    assert second["stats"]["bytes_sent"] <= 0.01 * weight_bytes, second["stats"]
    assert second["stats"]["uploads"] <= 1  # only the input, which is new
    assert second["stats"]["uploads_skipped"] >= 4


@torch.no_grad()
def test_execute_through_the_server(remote):
    w = torch.randn(16, 8)
    graph = genie.trace(lambda x: torch.relu(x @ w).sum(0), torch.randn(4, 16))
    x = torch.randn(4, 16)
    (got,) = remote.run(graph, [x], fetch=[0], keep=[], constants=graph.constants).fetched
    torch.testing.assert_close(got, torch.relu(x @ w).sum(0))


async def test_execute_in_trio(remote):
    w = torch.randn(16, 8)
    graph = genie.trace(lambda x: torch.tanh(x @ w), torch.randn(4, 16))
    x = torch.randn(4, 16)
    (got,) = await genie.execute(graph, x)
    torch.testing.assert_close(got, torch.tanh(x @ w))


async def test_execute_runs_the_fused_plan(remote):
    from _models import convnet

    model = convnet()
    graph = genie.trace(model, torch.randn(1, 3, 16, 16))
    plan = genie.schedule(graph)
    assert any(n.op == "genie.conv2d_bn_act" for n in plan.graph.nodes)
    x = torch.randn(1, 3, 16, 16)
    (got,) = await genie.execute(graph, x)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
