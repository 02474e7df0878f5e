"""The scheduler's plan: fused execution, stage order, residency, transfers, cache, and the in-process
executor that runs it (spans, early outputs, peak memory)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from test_semantic_workload import captured, example, model, traced

import genie
from genie._plan_exec import run_plan
from genie._profile import span
from genie.graph import CONST, INPUT, SOURCE_OPS
from genie.semantic import Residency, Scheduler
from genie.server import Interpreter

CPU = torch.device("cpu")


def run(g: genie.Graph, inputs) -> list[torch.Tensor]:
    return Interpreter(g, device=CPU, constants=g.constants).run(list(inputs))


# -- fusion ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, fused", [
    ("gpt2", {"attention": 3}), ("gpt2-eager", {"attention": 3}), ("llama", {"attention": 2}),
    ("clip", {"attention": 4}), ("convnet", {"conv_bn_act": 2}), ("conv_blocks", {"conv_bn_act": 3}),
])
def test_fused_plan_computes_the_same(name: str, fused: dict[str, int]) -> None:
    g = traced(name)
    plan = genie.schedule(g)
    kinds: dict[str, int] = {}
    for grp in plan.fusion_groups:
        kinds[grp.kind] = kinds.get(grp.kind, 0) + 1
        assert plan.graph.nodes[grp.node].op == grp.op
    assert kinds == fused, plan.unfused
    assert len(plan.graph.nodes) < len(g.nodes)
    assert not any(n.op.startswith("genie.") and n.op not in SOURCE_OPS for n in g.nodes)
    want, got = run(g, example(name)), run(plan.graph, example(name))
    assert len(want) == len(got)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_fusion_is_skipped_when_an_intermediate_escapes() -> None:
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))

    def attn_and_probs(q, k, v):  # the probabilities are returned: the group cannot vanish
        p = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
        return p @ v, p

    g = genie.trace(attn_and_probs, q, k, v)
    plan = genie.schedule(g)
    assert not plan.fusion_groups and len(plan.graph.nodes) == len(g.nodes)
    ((kind, _, why),) = plan.unfused
    assert kind == "attention" and ("output" in why or "read by" in why)
    head16 = genie.trace(lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), -1) @ v,
                         *(torch.randn(1, 2, 8, 8) for _ in range(3)))
    assert "head_dim 8" in genie.schedule(head16).unfused[0][2]  # no kernel for it


@pytest.mark.parametrize("name", ["gpt2", "convnet"])
def test_fused_graph_survives_the_wire(name: str) -> None:
    plan = genie.schedule(traced(name))
    g2 = genie.Graph.from_bytes(plan.graph.to_bytes())
    assert g2.digest == plan.graph.digest and not g2.constants  # weights travel apart, by digest
    g2.constants = plan.graph.constants
    for a, b in zip(run(plan.graph, example(name)), run(g2, example(name)), strict=True):
        torch.testing.assert_close(b, a)


def test_kernel_limits_match_genie_kernels() -> None:
    from genie.kernels import _attention

    from genie.semantic import _scheduler

    assert _scheduler.ATTENTION_HEAD_DIMS == _attention.HEAD_DIMS


# -- stages, residency, transfers ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama", "clip", "conv_blocks"])
def test_stages_respect_data_and_mutation_edges(name: str) -> None:
    plan = genie.schedule(captured(name))
    g = plan.graph
    seen = [nid for s in plan.stages for nid in s.nodes]
    assert sorted(seen) == list(range(len(g.nodes)))  # each node in exactly one stage
    for s in plan.stages:
        assert list(s.nodes) == sorted(s.nodes)
        for nid in s.nodes:
            assert plan.stage_of[nid] == s.index
            assert all(plan.stage_of[d] <= s.index for d in g.dependencies[nid])
        for r in s.needs:
            assert plan.stage_of[r.node] < s.index or g.nodes[r.node].op in SOURCE_OPS
    compute = [nid for nid in seen if g.nodes[nid].op not in SOURCE_OPS]
    assert compute == sorted(compute)  # stage order is program order


def test_residency_and_upload_order() -> None:
    g = traced("clip")  # (ids, pixels): the image tower runs first, so input 1 goes first
    plan = genie.schedule(g)
    pg = plan.graph
    for n in pg.nodes:
        want = {CONST: Residency.WEIGHT, INPUT: Residency.INPUT}.get(n.op)
        if want is not None:
            assert plan.residency[n.id] is want
    assert all(t.pinned == (pg.nodes[t.node].op == CONST) for t in plan.uploads)
    first_use = {}
    for n in pg.nodes:
        for r in n.refs():
            first_use.setdefault(r.node, n.id)
    order = [first_use[t.node] for t in plan.uploads]
    assert order == sorted(order)  # uploads in first-use order
    stages = [t.stage for t in plan.uploads]
    assert stages == sorted(stages)
    assert [t.what for t in plan.uploads if not t.pinned] == ["input 1", "input 0"]  # image tower first
    assert {t.key for t in plan.downloads} == set(range(len(pg.outputs)))
    assert 0 < plan.peak_bytes < plan.activation_bytes


def test_large_input_opens_a_stage_and_early_output_closes_one() -> None:
    def two_phase(x, big):
        a = torch.relu(x @ x.T)  # needs only x: can run while big is still arriving
        b = torch.tanh(a.sum() + big * 2.0)
        return a, b

    x, big = torch.randn(128, 128), torch.randn(512, 512)
    plan = genie.schedule(genie.trace(two_phase, x, big))
    assert len(plan.stages) == 2
    s0, s1 = plan.stages
    assert s0.uploads == (0,) and s1.uploads == (1,)  # the first stage does not wait for big
    assert [t.what for t in plan.uploads] == ["input 0", "input 1"]
    assert s0.ready_outputs == (0,) and s1.ready_outputs == (1,)  # a goes back before b is done
    assert plan.downloads[0].stage == 0


def test_a_server_recomputes_the_same_plan_from_the_fused_graph() -> None:
    for name in ("gpt2", "conv_blocks"):
        plan = genie.schedule(captured(name))
        again = Scheduler().schedule(plan.graph)  # what a peer holding only plan.graph can do
        assert not again.fusion_groups and again.graph.digest == plan.graph.digest
        assert again.stages == plan.stages and again.uploads == plan.uploads
        assert again.downloads == plan.downloads
        wire = json.loads(json.dumps(plan.stage_schedule().to_wire()))  # what the server is sent
        assert genie.graph.StageSchedule.from_wire(wire).check(plan.graph) is not None
    with pytest.raises(ValueError, match="key_by"):
        Scheduler(key_by="shape")


def test_plan_prints_readably() -> None:
    text = str(genie.schedule(traced("gpt2")))
    assert text.startswith("ExecutionPlan ") and "LLM/prefill" in text
    assert "stage 0 [" in text and "genie.attention(" in text and "causal=True" in text
    assert "uploads, in first-use order: input 0" in text and "downloads" in text and "residency" in text
    conv = str(genie.schedule(traced("conv_blocks")))
    assert "genie.conv2d_bn_act(" in conv and "activation='silu'" in conv and "VISION" in conv


def test_plans_are_cached_by_digest() -> None:
    s = Scheduler()
    g1 = captured("convnet")
    p1 = s.schedule(g1, genie.analyze(g1))
    x = example("convnet")[0]
    with genie.capture():
        out = model("convnet")(x)  # noqa: F841
    g2 = genie.get_graph()
    assert g2.digest == g1.digest
    assert s.schedule(g2) is p1 and s.hits == 1 and s.cached(p1.key) is p1
    with genie.capture():
        out = model("convnet")(torch.randn(4, 3, 16, 16))  # noqa: F841 (another shape: another plan)
    p3 = s.schedule(genie.get_graph())
    assert p3 is not p1 and p3.key != p1.key
    unfused = Scheduler(fuse=False).schedule(g1)
    assert unfused.key != p1.key and not unfused.fusion_groups and len(unfused.graph.nodes) == len(g1.nodes)
    with pytest.raises(ValueError, match="another graph"):
        s.schedule(g1, genie.analyze(captured("gpt2")))


# -- running the plan --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "conv_blocks"])
def test_run_plan_frees_activations(name: str) -> None:
    plan = genie.schedule(traced(name))
    result = run_plan(plan, example(name))
    for a, b in zip(run(traced(name), example(name)), result.outputs, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert 0 < result.peak_bytes < result.activation_bytes, (result.peak_bytes, result.activation_bytes)
    if name == "gpt2":  # a deep stack: a few layers' worth alive at once, not all of them
        assert result.peak_bytes < result.activation_bytes / 4
    assert len(result.stage_times) == len(plan.stages)
    starts = [t0 for t0, _ in result.stage_times]
    assert starts == sorted(starts)


def test_run_plan_streams_inputs_and_outputs() -> None:
    def two_phase(x, big):
        a = torch.relu(x @ x.T)
        return a, torch.tanh(a.sum() + big * 2.0)

    x, big = torch.randn(128, 128), torch.randn(512, 512)
    plan = genie.schedule(genie.trace(two_phase, x, big))
    events: list[tuple[str, int, float]] = []

    def wait_input(pos: int) -> None:
        events.append(("wait", pos, time.perf_counter()))

    shipped = {}
    result = run_plan(plan, [x, big], wait_input=wait_input,
                      on_output=lambda i, t: shipped.setdefault(i, t.clone()))
    assert [(e, p) for e, p, _ in events] == [("wait", 0), ("wait", 1)]
    (s0_start, s0_end), (s1_start, s1_end) = result.stage_times
    assert events[1][2] >= s0_end  # big was first needed after stage 0 had finished
    assert result.output_times[0] < s1_end  # output 0 was handed over before the last stage ended
    torch.testing.assert_close(shipped[0], torch.relu(x @ x.T))


def test_profile_records_spans_and_exports_a_chrome_trace(tmp_path) -> None:
    plan = genie.schedule(traced("gpt2"))
    assert span("x") is span("y")  # no profile active: one shared no-op
    with genie.profile() as prof:
        run_plan(plan, example("gpt2"), wait_input=lambda pos: None, on_output=lambda i, t: t.clone())
    cats = {s.cat for s in prof.spans}
    assert {"compute", "download", "wait"} <= cats
    assert len(prof.by_cat("compute")) == len(plan.stages)
    path = prof.export_chrome_trace(tmp_path / "trace.json")
    trace = json.loads(path.read_text())
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(prof.spans) and all(e["dur"] >= 0 and "pid" in e and "tid" in e for e in xs)
    text = prof.summary(print_=False)
    assert "stage 0" in text and "compute" in text and "totals:" in text
