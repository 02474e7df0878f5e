"""The plan on every path: plans keyed by structure (a decode step re-instantiates the last step's
plan, facts that depend on sizes derived again), device-mode flushes and ``execute`` running the
fused, staged plan, and one executor path on the server side."""

from __future__ import annotations

import pathlib

import _server_fixtures as fx
import numpy as np
import pytest
import torch
from _models import convnet
from test_server_model import PROMPT, greedy, tiny_gpt2

import genie
from genie.graph._template import _split, split
from genie.semantic import Scheduler, run_scheduler
from genie.server import Interpreter

server, any_backend = fx.server, fx.any_backend  # fixtures, by name
DEVICE = "remote_accelerator:0"
CPU = torch.device("cpu")


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Eager attention whose mask is built from the sizes: causal when q_len == k_len, and all
    allowed for one query over a longer cache. The same structure at every size."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    pos = lambda n: torch.arange(n, device=q.device)  # noqa: E731
    mask = pos(n_k)[None, :] <= pos(n_q)[:, None] + (n_k - n_q)  # a shifted tril
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


def qkv(n_q: int, n_k: int, head_dim: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n_q * 100 + n_k)
    return [torch.randn(1, 2, n, head_dim, generator=g) for n in (n_q, n_k, n_k)]


def run(g: genie.Graph, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return Interpreter(g, device=CPU, constants=g.constants).run(inputs)


def check_split(g: genie.Graph) -> None:
    """The template split a graph carries (a re-instantiated plan's is gathered, not emitted) is
    the one emitting it gives: what the server rebuilds is this very graph."""
    got, fresh = split(g), _split(g)
    assert got is not None and fresh is not None
    assert (got.skeleton, got.digest, got.strs) == (fresh.skeleton, fresh.digest, fresh.strs)
    assert np.array_equal(got.ints, fresh.ints)


def fused_kwargs(plan: genie.ExecutionPlan) -> list[dict]:
    return [dict(plan.graph.nodes[grp.node].kwargs) for grp in plan.fusion_groups]


# -- plans keyed by structure ---------------------------------------------------------------------
def test_a_new_size_reinstantiates_the_plan_and_rederives_causality() -> None:
    s = Scheduler(key_by="structure")
    prefill = genie.trace(masked_attention, *qkv(8, 8))
    p0 = s.schedule(prefill)
    assert [kw["causal"] for kw in fused_kwargs(p0)] == [True]
    for n_q, n_k in [(1, 9), (1, 10), (1, 11), (2, 12)]:
        inputs = qkv(n_q, n_k)
        g = genie.trace(masked_attention, *inputs)
        before = s.reinstantiated
        plan = s.schedule(g)
        assert s.reinstantiated == before + 1  # no analysis: the cached plan, re-instantiated
        cold = Scheduler().schedule(g)  # what planning this graph from scratch gives
        assert plan.graph.digest == cold.graph.digest
        assert (plan.stage_schedule().starts, plan.stage_schedule().ready) == \
            (cold.stage_schedule().starts, cold.stage_schedule().ready)
        assert plan.stream == cold.stream and plan.uploads == cold.uploads
        assert [(st.flops, st.bytes) for st in plan.stages] == [(st.flops, st.bytes) for st in cold.stages]
        assert (plan.peak_bytes, plan.activation_bytes) == (cold.peak_bytes, cold.activation_bytes)
        check_split(plan.graph)
        # one query over a longer cache sees every key: a copied causal=True would hide all but one
        assert [kw["causal"] for kw in fused_kwargs(plan)] == [cold.fusion_groups[0].info["causal"]]
        (want,) = run(g, inputs)
        (got,) = run(plan.graph, inputs)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, masked_attention(*inputs), atol=1e-5, rtol=1e-5)
    assert fused_kwargs(s.schedule(genie.trace(masked_attention, *qkv(1, 9))))[0]["causal"] is False
    assert s.schedule(genie.trace(masked_attention, *qkv(8, 8))) is p0  # the very graph: the very plan


def test_a_fact_that_no_longer_holds_plans_cold() -> None:
    s = Scheduler(key_by="structure")
    s.schedule(genie.trace(masked_attention, *qkv(8, 8)))
    inputs = qkv(8, 8, head_dim=8)  # same structure, but no attention kernel for head_dim 8
    g = genie.trace(masked_attention, *inputs)
    plan = s.schedule(g)
    assert s.reinstantiated == 0 and s.misses == 2
    assert not plan.fusion_groups and "head_dim 8" in plan.unfused[0][2]
    torch.testing.assert_close(run(plan.graph, inputs)[0], masked_attention(*inputs), atol=1e-5, rtol=1e-5)
    assert s.schedule(g) is plan  # the very graph again: the plan as it is


def test_sdpa_is_causal_is_fused_only_where_torch_and_the_kernel_agree() -> None:
    """torch's is_causal masks top-left, the kernels bottom-right: equal only when q_len == kv_len."""
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    s = Scheduler(key_by="structure")
    p0 = s.schedule(genie.trace(sdpa, *qkv(8, 8)))
    assert [kw["causal"] for kw in fused_kwargs(p0)] == [True]
    for n_q, n_k in [(1, 9), (2, 10)]:
        inputs = qkv(n_q, n_k)
        plan = s.schedule(genie.trace(sdpa, *inputs))
        assert not plan.fusion_groups and plan.unfused  # a top-left mask: not the kernel's
        torch.testing.assert_close(run(plan.graph, inputs)[0], sdpa(*inputs), atol=1e-5, rtol=1e-5)
    assert s.misses == 2  # (1, 9): the cached plan's fact failed on the new sizes, so it was planned cold


def test_a_few_queries_against_a_cache_run_decode_attention() -> None:
    from genie.kernels import _decode

    from genie.semantic import _scheduler

    assert _scheduler.DECODE_MAX_Q_LEN == _decode.MAX_Q_LEN
    s = Scheduler(key_by="structure")
    for n_q, n_k, op in [(8, 8, "genie.attention"), (1, 9, "genie.decode_attention"),
                         (2, 12, "genie.decode_attention"), (1, 13, "genie.decode_attention")]:
        inputs = qkv(n_q, n_k)
        plan = s.schedule(genie.trace(masked_attention, *inputs))
        (grp,) = plan.fusion_groups
        node = plan.graph.nodes[grp.node]
        assert node.op == op
        if op == "genie.decode_attention":
            assert node.args[3] == n_k  # the valid cache length, derived again at every size
        want = masked_attention(*inputs)
        torch.testing.assert_close(run(plan.graph, inputs)[0], want, atol=1e-5, rtol=1e-5)
    assert s.reinstantiated == 3  # the prefill's plan, its fused op chosen again at each size


# -- device mode and execute run the plan ---------------------------------------------------------
class Spy:
    """Records the graphs a backend is asked to run or submit (and whether they came with stages)."""

    def __init__(self, backend) -> None:
        self.runs: list[tuple[genie.Graph, dict]] = []
        self.gathered = 0  # graphs that came with their template split already made
        self._run, self._submit = backend.run, backend.submit
        backend.run = self
        backend.submit = self.submit

    def __call__(self, graph, inputs, **kw):
        self.runs.append((graph, kw))
        self.gathered += "_split" in graph.__dict__
        return self._run(graph, inputs, **kw)

    def submit(self, graph, inputs, **kw):  # a compiled replay: run, not waited for
        self.runs.append((graph, kw))
        self.gathered += "_split" in graph.__dict__
        return self._submit(graph, inputs, **kw)

    def fused_ops(self) -> set[str]:
        fused = {"genie.attention", "genie.decode_attention", "genie.conv2d_bn_act"}
        return {n.op for g, _ in self.runs for n in g.nodes if n.op in fused}


@torch.no_grad()
def test_device_mode_decode_runs_the_fused_plan_with_no_analysis_per_step(any_backend) -> None:
    model = tiny_gpt2()
    want = greedy(model, PROMPT, 12)
    spy = Spy(any_backend)
    sched = run_scheduler()
    analyzed = genie.semantic._analyzer.default_analyzer().misses
    reinst = sched.reinstantiated
    got = greedy(model.to(DEVICE), PROMPT, 12, device=DEVICE)
    assert got == want
    assert {"genie.attention", "genie.decode_attention"} <= spy.fused_ops()  # prefill, then decode
    assert spy.gathered >= 9  # decode steps: the plan graph's split gathered, never emitted
    for g, _ in spy.runs:
        check_split(g)
    staged = [kw for _, kw in spy.runs if kw.get("stages") is not None]
    assert staged and all(len(kw["stages"].ready) == len(g.outputs) for g, kw in spy.runs if kw.get("stages"))
    # prefill and the first decode step are planned cold; every later step re-instantiates
    assert sched.reinstantiated - reinst >= 9
    assert genie.semantic._analyzer.default_analyzer().misses - analyzed <= 3


@torch.no_grad()
def test_hf_generate_in_device_mode_runs_fused_attention(any_backend) -> None:
    from test_semantic_workload import llama

    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    kw = {"max_new_tokens": 6, "do_sample": False}
    want = llama().generate(ids, **kw).tolist()
    spy = Spy(any_backend)
    assert llama().to(DEVICE).generate(ids.to(DEVICE), **kw).tolist() == want
    assert {"genie.attention", "genie.decode_attention"} & spy.fused_ops()


@torch.no_grad()
def test_device_mode_conv_net_runs_conv_bn_act_fused(any_backend) -> None:
    net = convnet()
    x = torch.randn(2, 3, 16, 16)
    want = net(x)
    spy = Spy(any_backend)
    got = net.to(DEVICE)(x.to(DEVICE)).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert "genie.conv2d_bn_act" in spy.fused_ops()


@torch.no_grad()
def test_a_tiny_op_runs_unstaged(any_backend) -> None:
    spy = Spy(any_backend)
    x = torch.ones(3).to(DEVICE)
    assert (x + 2).sum().item() == 9.0
    assert spy.runs and all(kw.get("stages") is None for _, kw in spy.runs)


@torch.no_grad()
def test_compile_replays_run_the_fused_plan(any_backend) -> None:
    step = genie.compile(masked_attention)
    spy = Spy(any_backend)
    for i in range(3):
        inputs = [t + i for t in qkv(8, 8)]
        out = step(*(t.to(DEVICE) for t in inputs))
        torch.testing.assert_close(out.cpu(), masked_attention(*inputs), atol=1e-5, rtol=1e-5)
    assert step.replays >= 1
    replayed = [g for g, kw in spy.runs if kw.get("stages") is not None or any(
        n.op == "genie.attention" for n in g.nodes)]
    assert len(replayed) >= 2 and all(any(n.op == "genie.attention" for n in g.nodes) for g in replayed)


async def test_execute_reuses_the_plan_across_sizes(any_backend) -> None:
    sched = run_scheduler()
    for n_k in (9, 10, 11):
        inputs = qkv(1, n_k)
        g = genie.trace(masked_attention, *inputs)
        before = sched.reinstantiated
        (got,) = await genie.execute(g, *inputs)
        torch.testing.assert_close(got, masked_attention(*inputs), atol=1e-5, rtol=1e-5)
    assert sched.reinstantiated > before


# -- one executor, and the layers ----------------------------------------------------------------
def test_server_imports_no_runtime_and_runtime_no_server() -> None:
    src = pathlib.Path(genie.__file__).parent
    for layer, banned in (("server", "genie.runtime"), ("runtime", "genie.server")):
        for f in (src / layer).glob("*.py"):
            text = f.read_text()
            assert f"from {banned}" not in text and f"import {banned}" not in text, f


def test_local_backend_runs_on_the_server_executor() -> None:
    from genie.runtime import LocalBackend
    from genie.server import InProcessExecutor

    b = LocalBackend("cpu")
    assert isinstance(b.executor, InProcessExecutor)
    w = torch.randn(4, 4)
    g = genie.trace(lambda x: torch.relu(x @ w), torch.randn(2, 4))
    x = torch.randn(2, 4)
    r = b.run(g, [x], fetch=[0], keep=[0], constants=g.constants)
    torch.testing.assert_close(r.fetched[0], torch.relu(x @ w))
    (h,) = r.handles
    assert h in b.executor.residents and b.executor.pool.missing(list(g.constants)) == []
    r2 = b.run(g, [x], fetch=[], keep=[0], constants=g.constants)
    with b._lock:  # a run in progress (a finalizer fires inside it): the free waits, never blocks
        b.free(h)
        assert h in b.executor.residents
    b.free(r2.handles[0])
    assert h not in b.executor.residents and r2.handles[0] not in b.executor.residents


def test_semantic_keeps_no_dead_public_names() -> None:
    from genie.semantic import ExecutionPlan, PatternRegistry

    assert not hasattr(ExecutionPlan, "fused_graph")
    assert not hasattr(PatternRegistry, "rules") and not hasattr(PatternRegistry, "kinds")
    with pytest.raises(ValueError, match="key_by"):
        Scheduler(key_by="shapes")
