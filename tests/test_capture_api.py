"""genie.capture / get_graph / trace / execute, and thread isolation."""

import threading

import pytest
import torch
import trio
from _models import gpt2

import genie

DEV = "remote_accelerator:0"


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).eval()


def test_capture_records_factories_weights_and_inputs():
    model = _mlp()
    x = torch.randn(2, 16)
    with genie.capture():
        noise = torch.randn(2, 16)  # a factory with no device: lazy
        out = model(x + noise)
    assert isinstance(noise, genie.LazyTensor) and isinstance(out, genie.LazyTensor)
    g = genie.get_graph()
    ops = [n.op for n in g.nodes]
    assert ops.count("genie.const") == 4  # two weights, two biases, named by content
    assert len(g.inputs) == 1 and g.nodes[g.inputs[0]].outputs[0].shape == (2, 16)
    assert "aten.randn.default" in ops
    assert any(g.nodes[r.node].op == "aten.addmm.default" for r in g.outputs)
    torch.testing.assert_close(out.cpu(), model(x + noise.cpu()))


def test_capture_on_a_cpu_model_matches_eager_via_to_fx():
    model = gpt2()
    ids = torch.randint(0, 128, (1, 6))
    with genie.capture():
        logits = model(ids).logits
    g = genie.get_graph()
    assert len(g.inputs) == 1
    logits_ref = next(r for r in g.outputs if g.meta(r).shape == (1, 6, 128))
    gm = genie.Graph(g.nodes, [logits_ref], g.constants).to_fx()
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), model(ids).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.cpu(), model(ids).logits.detach(), atol=1e-5, rtol=1e-5)


def test_captures_nest_and_each_has_its_graph():
    with genie.capture():
        a = torch.ones(3) * 2
        with genie.capture():
            b = torch.ones(3) + 1
        inner = genie.get_graph()
        c = a + b
    outer = genie.get_graph()
    assert inner is not outer
    assert c.cpu().tolist() == [4.0, 4.0, 4.0]
    assert any(n.op == "aten.mul.Tensor" for n in outer.nodes)
    assert not any(n.op == "aten.mul.Tensor" for n in inner.nodes)


def test_module_paths_are_recorded():
    model = gpt2()
    with genie.capture():
        out = model(torch.randint(0, 128, (1, 4))).logits  # noqa: F841 (kept: an output)
    paths = {n.module for n in genie.get_graph().nodes}
    assert "transformer.h.0.attn" in paths and "transformer.h.1.mlp.c_fc" in paths


def test_threads_do_not_leak_into_each_other():
    errors, graphs = [], {}
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            barrier.wait()
            with genie.capture():
                x = torch.full((4,), float(i))
                for _ in range(20):
                    x = x + i
            g = genie.get_graph()
            assert all(n.op in ("aten.full.default", "aten.add.Tensor") for n in g.nodes), g
            assert x.cpu().tolist() == [float(i + 20 * i)] * 4
            graphs[i] = g
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({g.digest for g in graphs.values()}) == 8  # the fill value differs per thread


def test_get_graph_without_capture_in_thread_errors():
    out: list = []
    t = threading.Thread(target=lambda: out.append(pytest.raises(RuntimeError, genie.get_graph)))
    t.start()
    t.join()
    assert out


def test_trace_has_explicit_inputs_and_outputs_and_executes():
    model = _mlp()
    g = genie.trace(lambda x: model(x).softmax(-1), torch.randn(3, 16))
    assert len(g.inputs) == 1 and len(g.outputs) == 1

    async def main():
        new = torch.randn(3, 16)
        (got,) = await genie.execute(g, new)
        torch.testing.assert_close(got, model(new).softmax(-1))

    trio.run(main)


async def test_execute_runs_concurrently_from_trio():
    model = _mlp()
    g = genie.trace(model, torch.randn(2, 16))
    xs = [torch.randn(2, 16) for _ in range(6)]
    results = {}

    async def one(i):
        results[i] = (await genie.execute(g, xs[i]))[0]

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(one, i)
    for i, x in enumerate(xs):
        torch.testing.assert_close(results[i], model(x))


async def test_execute_rejects_wrong_inputs():
    g = genie.trace(_mlp(), torch.randn(2, 16))
    with pytest.raises(TypeError, match="takes 1 inputs"):
        await genie.execute(g)
    with pytest.raises(TypeError, match="input 0"):
        await genie.execute(g, torch.randn(2, 16, dtype=torch.float64))
