"""Prefill on the first step of a decode loop, decode on the steps after it."""

from __future__ import annotations

import pytest
import torch
from test_semantic_workload import model

import genie
from genie.semantic import Phase, Residency, WorkloadType


def decode_loop(m: torch.nn.Module, steps: int = 3, prompt: int = 6,
                graphs: list | None = None) -> list[genie.WorkloadProfile]:
    """Greedy decoding, one capture per step; the KV cache of step n feeds step n+1."""
    profiles, cache = [], None
    tokens = torch.randint(0, 128, (1, prompt))
    for _ in range(steps):
        with genie.capture():
            out = m(tokens, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tokens = out.logits[:, -1:].argmax(-1)
        profiles.append(genie.analyze(genie.get_graph()))
        if graphs is not None:
            graphs.append(genie.get_graph())
    return profiles


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", ["gpt2", "gpt2-eager", "llama"])
def test_prefill_then_decode(name: str) -> None:
    profiles = decode_loop(model(name))
    assert [p.workload for p in profiles] == [WorkloadType.LLM] * 3
    assert [p.phase for p in profiles] == [Phase.PREFILL, Phase.DECODE, Phase.DECODE]
    lengths = [(p.phase_evidence["q_len"], p.phase_evidence["kv_len"]) for p in profiles]
    assert lengths == [(6, 6), (1, 7), (1, 8)]
    assert [p.phase_evidence["past_len"] for p in profiles] == [0, 6, 7]
    layers = len(profiles[0].by_kind("attention"))
    for p in profiles:  # k and v of every layer are appended to the cache, every step
        caches = p.by_kind("kv_cache_update")
        assert len(caches) == 2 * layers and all(c.form == "cat" for c in caches)
    # after the first step the past is a value that stayed on the remote
    assert {c["source"] for c in profiles[1].by_kind("kv_cache_update")} == {"genie.resident"}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_decode_plan_keeps_cache_resident() -> None:
    graphs: list[genie.Graph] = []
    profiles = decode_loop(model("llama"), steps=2, graphs=graphs)
    g, p = graphs[1], profiles[1]
    plan = genie.schedule(g, p)
    assert plan.phase is Phase.DECODE and len(plan.fusion_groups) == 2
    kv = [nid for nid, r in plan.residency.items() if r is Residency.KV_CACHE]
    assert len(kv) == 8  # per layer: past k, past v (resident) and the updated k, v (kept)
    kept = {i for s in plan.stages for i in s.keep_outputs}
    downloaded = {t.key for t in plan.downloads}
    assert len(kept) == 4 and not kept & downloaded
    assert all(plan.graph.nodes[plan.graph.outputs[i].node].op == "aten.cat.default" for i in kept)
