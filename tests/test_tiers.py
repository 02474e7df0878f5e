"""The server's tiers: generated code (tier 1) and Inductor (tier 2) against the interpreter (tier 0).

Unit tests run ``Tiers`` in this process on graphs from ``genie.trace``; the end-to-end ones run
``generate`` through real ``genie serve`` processes. Tier 2 compiles for real (AOTInductor, gcc):
each compile takes about half a minute here, so the tier-2 tests share two compiles between them.
"""

from __future__ import annotations

import math
import shutil
import time
from collections import Counter
from pathlib import Path

import _server_fixtures as fx
import pytest
import torch
import torch.nn.functional as F
from _models import decode_gpt2, decode_llama

import genie
from genie.graph import Graph, Template, split
from genie.server import Interpreter, Tiers, mark_program
from genie.server._codegen import Program
from genie.server._inductor import artefact_path
from genie.server._tiers import COMPILE_AFTER, RunValues, close

CPU = torch.device("cpu")
DEV = "remote_accelerator:0"


def program(fn, *inputs: torch.Tensor) -> Graph:
    """``fn`` traced, and marked as a replayed program (a filled template), as the server's reader does."""
    g = genie.trace(fn, *inputs)
    parts = split(g)
    assert parts is not None
    mark_program(g, parts.digest, Template(parts.skeleton).program_ints(parts.ints, g))
    return g


def eager(g: Graph, inputs) -> list[torch.Tensor]:
    return Interpreter(g, device=CPU, constants=g.constants).run(list(inputs))


def tiered(tiers: Tiers, g: Graph, inputs) -> list[torch.Tensor]:
    key = g.__dict__["_program_key"]
    return tiers.run(key, RunValues(g, list(inputs), g.constants, {}, (), None))


W = torch.randn(16, 8)


def _mlp(x, w):
    h = F.gelu(x @ w, approximate="tanh")
    top = torch.topk(h, 2, dim=-1)  # a multi-output op
    y = h.clone()
    y.add_(1.5).mul_(top.values[:, :1])  # in-place writes on a fresh value
    return F.layer_norm(y.transpose(0, 1).contiguous(), (3,)), F.embedding(torch.tensor([[1, 3]]), W)


def _scalars(x):
    return x * math.inf, x + math.nan, x * -0.0, torch.clamp(x, min=-math.inf, max=1e30), x / 3.0


@pytest.mark.parametrize("fn, shapes", [(_mlp, [(3, 4), (4, 4)]), (_scalars, [(2, 3)])],
                         ids=["mlp", "scalars"])
def test_generated_code_equals_the_interpreter(fn, shapes):
    torch.manual_seed(0)
    inputs = [torch.randn(s) for s in shapes]
    g = program(fn, *inputs)
    stats: Counter = Counter()
    tiers = Tiers("codegen", Path("/nonexistent"), CPU, stats)
    for _ in range(4):
        xs = [torch.randn(s) for s in shapes]
        want = eager(g, xs)
        got = tiered(tiers, g, xs)
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape and a.stride() == b.stride()
            assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)) and torch.equal(a.isnan(), b.isnan())
    assert stats["runs_tier0"] == 1 and stats["runs_tier1"] == 3  # built at its second run


def test_generated_source_holds_no_client_text():
    """Strings, kwarg names and scalars from the graph are namespace objects, never source text: the
    source has no string literal and no digit the client chose."""
    hostile = "tanh'); __import__('os').system('true'); ('"
    x = torch.randn(2, 3)
    g = genie.trace(lambda x: F.gelu(x, approximate="tanh") * 12345.678 + 2**62, x)
    nodes = [n.replace(kwargs={**n.kwargs, "approximate": hostile}) if n.op.startswith("aten.gelu") else n
             for n in g.nodes]
    bad = Graph(nodes, g.outputs, g.constants)
    prog = Program.build(bad, CPU, set())
    assert prog is not None
    assert "'" not in prog.source and '"' not in prog.source
    assert "12345" not in prog.source and str(2**62) not in prog.source
    from genie.server._guards import Guards, GuardTables

    guards = Guards(GuardTables.of({n.op for n in bad.nodes if n.op != "genie.input"}), CPU)
    with pytest.raises(genie.RemoteExecutionError) as e:  # gelu refuses the string itself
        prog.run(bad, [x], constants={}, residents={}, guards=guards)
    assert e.value.op.startswith("aten.gelu")


def test_programs_that_differ_only_in_a_size_or_a_constant_stay_apart():
    stats: Counter = Counter()
    tiers = Tiers("codegen", Path("/nonexistent"), CPU, stats)
    x = torch.randn(4, 2)
    a = program(lambda x: x.reshape(2, 4) * 2.5, x)
    b = program(lambda x: x.reshape(8, 1) * 2.5, x)
    c = program(lambda x: x.reshape(2, 4) * 3.5, x)
    assert a.__dict__["_program_key"] != b.__dict__["_program_key"] != c.__dict__["_program_key"]
    for _ in range(3):
        for g in (a, b, c):
            xs = [torch.randn(4, 2)]
            (got,), (want,) = tiered(tiers, g, xs), eager(g, xs)
            assert got.shape == want.shape and torch.equal(got, want)
    assert stats["tier1_programs"] == 3


def test_close_is_relative_to_the_tensor_and_strict_for_integers():
    w = torch.tensor([100.0, 1e-3, 0.0])
    assert close(w + 1e-3, w)  # rounding at the tensor's scale, near zero too
    assert not close(w + torch.tensor([0.0, 0.5, 0.0]), w)
    assert not close(torch.tensor([1, 2]), torch.tensor([1, 3]))
    assert close(torch.tensor([math.nan, 1.0]), torch.tensor([math.nan, 1.0]))
    assert not close(torch.tensor([math.inf, 1.0]), torch.tensor([1.0, 1.0]))


# -- tier 2 --------------------------------------------------------------------------------------
E, E2 = torch.randn(32, 8), torch.randn(32, 8)


def _relu(ids, x):
    return (F.embedding(ids, E) * x).relu().sum(-1) + F.embedding(ids, E2).sum(-1)


def _sigmoid(ids, x):  # the same sources and outputs as _relu: another program
    return (F.embedding(ids, E) * x).sigmoid().sum(-1) + F.embedding(ids, E2).sum(-1)


def _inputs():
    return [torch.randint(0, 32, (2, 3)), torch.randn(2, 3, 8)]


def _wait(tiers: Tiers, limit: float = 600.0) -> None:
    t0 = time.monotonic()
    while any(p["compiling"] for p in tiers.report()):
        assert time.monotonic() - t0 < limit, tiers.report()
        time.sleep(0.2)


def _run_until_compiled(tiers: Tiers, g: Graph) -> None:
    for _ in range(COMPILE_AFTER):
        xs = _inputs()
        torch.testing.assert_close(tiered(tiers, g, xs)[0], eager(g, xs)[0], rtol=0, atol=0)
    _wait(tiers)


@pytest.fixture(scope="module")
def compiled_relu(tmp_path_factory) -> tuple[Path, Graph]:
    """One real compile of ``_relu``, in a cache directory the tests copy from."""
    cache = tmp_path_factory.mktemp("compile")
    stats: Counter = Counter()
    tiers = Tiers("inductor", cache, CPU, stats, min_ms=0.0)
    g = program(_relu, *_inputs())
    _run_until_compiled(tiers, g)
    assert stats["tier2_compiles"] == 1, tiers.report()
    return cache, g


def test_inductor_tier_is_checked_then_trusted_and_refuses_bad_indices(compiled_relu, tmp_path):
    cache, g = compiled_relu
    shutil.copytree(cache, tmp_path, dirs_exist_ok=True)
    stats: Counter = Counter()
    tiers = Tiers("inductor", tmp_path, CPU, stats, min_ms=0.0)  # a restarted server: the package is on disk
    _run_until_compiled(tiers, g)
    assert stats["tier2_loaded"] == 1 and stats["tier2_compiles"] == 0
    for _ in range(3):
        xs = _inputs()
        torch.testing.assert_close(tiered(tiers, g, xs)[0], eager(g, xs)[0])
    assert stats["tier2_checks"] == 1 and stats["runs_tier2"] == 3
    assert [p["tier"] for p in tiers.report()] == [2]
    bad = [torch.tensor([[0, 1, 10**6]] * 2), torch.randn(2, 3, 8)]
    with pytest.raises(genie.RemoteExecutionError, match="out of bounds"):
        tiered(tiers, g, bad)
    xs = _inputs()  # and it goes on
    torch.testing.assert_close(tiered(tiers, g, xs)[0], eager(g, xs)[0])
    # the same program, its two constants now one value (equal-valued buffers share a digest): it was
    # compiled for two apart, so this run goes to tier 1
    digests = [n.args[0] for n in g.nodes if n.op == "genie.const"]
    assert len(set(digests)) == 2
    nodes = [n.replace(args=(digests[0],)) if n.op == "genie.const" else n for n in g.nodes]
    one = Graph(nodes, g.outputs, g.constants)
    one.shared = g.shared
    one.__dict__["_program_key"] = g.__dict__["_program_key"]
    tier2 = stats["runs_tier2"]
    xs = _inputs()
    torch.testing.assert_close(tiered(tiers, one, xs)[0], eager(one, xs)[0], rtol=0, atol=0)
    assert stats["runs_tier2"] == tier2


def test_a_wrong_compiled_artefact_is_caught_and_tier_1_results_stand(compiled_relu, tmp_path):
    cache, relu = compiled_relu
    g = program(_sigmoid, *_inputs())
    # _relu's package, planted where _sigmoid's would be: it loads, and computes the wrong thing
    for suffix in (".pt2", ".json"):
        src = artefact_path(cache, relu.__dict__["_program_key"], CPU).with_suffix(suffix)
        shutil.copy(src, artefact_path(tmp_path, g.__dict__["_program_key"], CPU).with_suffix(suffix))
    stats: Counter = Counter()
    tiers = Tiers("inductor", tmp_path, CPU, stats, min_ms=0.0)
    _run_until_compiled(tiers, g)
    assert stats["tier2_loaded"] == 1
    xs = _inputs()
    (got,) = tiered(tiers, g, xs)
    torch.testing.assert_close(got, eager(g, xs)[0], rtol=0, atol=0)  # tier 1's result
    assert stats["tier2_rejected"] == 1 and stats["runs_tier2"] == 0
    (state,) = tiers.report()
    assert state["tier"] == 1 and "disagreed" in state["failure"]
    assert not artefact_path(tmp_path, g.__dict__["_program_key"], CPU).exists()
    for _ in range(2):  # for good: no second check, no compile
        xs = _inputs()
        torch.testing.assert_close(tiered(tiers, g, xs)[0], eager(g, xs)[0], rtol=0, atol=0)
    assert stats["tier2_checks"] == 1 and stats["tier2_compiles"] == 0


def test_a_compile_past_its_budget_leaves_the_program_on_tier_1(monkeypatch, tmp_path):
    import genie.server._tiers as tiers_module

    monkeypatch.setattr(tiers_module, "COMPILE_SECONDS", 0.5)
    stats: Counter = Counter()
    tiers = Tiers("inductor", tmp_path, CPU, stats, min_ms=0.0)
    g = program(_sigmoid, *_inputs())
    _run_until_compiled(tiers, g)
    assert stats["tier2_compile_failures"] == 1
    (state,) = tiers.report()
    assert state["tier"] == 1 and "longer than" in state["failure"]
    xs = _inputs()
    torch.testing.assert_close(tiered(tiers, g, xs)[0], eager(g, xs)[0], rtol=0, atol=0)


# -- end to end ------------------------------------------------------------------------------------


def _server_stats() -> dict:
    stats = genie.stats(server=True)
    return {k.removeprefix("server."): v for k, v in stats.items() if k.startswith("server.")}


@pytest.mark.parametrize("cache", ["static", None], ids=["static", "dynamic"])
@pytest.mark.parametrize("make", [decode_gpt2, decode_llama], ids=["gpt2", "llama"])
@torch.no_grad()
def test_generate_at_tier_1_equals_eager(make, cache):
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    kw = {"max_new_tokens": 8, "do_sample": False}
    if cache is not None:
        kw["cache_implementation"] = cache
    want = make().generate(ids, **kw).tolist()
    with fx.serving("--compile", "codegen") as s, fx.using(fx.RemoteBackend(s.address, s.token)):
        model = make().to(DEV)
        model.forward = genie.compile(model.forward)
        assert model.generate(ids.to(DEV), **kw).tolist() == want
        stats = _server_stats()
    assert stats["compile"] == "codegen"
    if cache == "static":  # every decode step is one program: generated code from its second run
        assert stats["runs_tier1"] >= 5
    else:  # the cache grows: every step is a program of new sizes, and runs once (interpreted)
        assert stats["runs_tier0"] >= 8


@pytest.mark.parametrize("make", [decode_gpt2, decode_llama], ids=["gpt2", "llama"])
@torch.no_grad()
def test_generate_at_tier_2_equals_eager(make, tmp_path, monkeypatch):
    """A static-cache decode step compiles (in the background), is checked, then decodes at tier 2."""
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    kw = {"max_new_tokens": 8, "do_sample": False, "cache_implementation": "static"}
    want = make().generate(ids, **kw).tolist()
    monkeypatch.setenv("GENIE_COMPILE_MIN_MS", "0")  # a tiny model's step: compiled however fast
    with fx.serving("--compile", "inductor", "--compile-cache", str(tmp_path)) as s, \
            fx.using(fx.RemoteBackend(s.address, s.token)):
        model = make().to(DEV)
        model.forward = genie.compile(model.forward)
        assert model.generate(ids.to(DEV), **kw).tolist() == want  # tiers 0 and 1; a compile starts
        t0 = time.monotonic()
        while any(p["compiling"] for p in _server_stats()["tiers"]):
            assert time.monotonic() - t0 < 600
            time.sleep(0.5)
        assert model.generate(ids.to(DEV), **kw).tolist() == want  # checked, then tier 2
        stats = _server_stats()
    assert stats["tier2_compiles"] >= 1 and stats["tier2_checks"] >= 1, stats["tiers"]
    assert stats["runs_tier2"] >= 4 and stats.get("tier2_rejected", 0) == 0, stats["tiers"]
    assert any(p["tier"] == 2 for p in stats["tiers"])
