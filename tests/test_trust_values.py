"""Values nobody else may change, and side effects nobody may drop (issue 9, items 4, 12, 14, 15).

- A hostile client that writes in place to a shared weight, declaring no write, gets its own copy;
  every other client keeps reading the weight as uploaded.
- Content digests deduplicate bytes, never identities: equal buffers are distinct values.
- A write to a live module buffer runs even when nothing reads its result.
- A remote tensor passed to ``genie.execute`` works, and leaves later calls unaffected.
"""

from __future__ import annotations

import _server_fixtures as fx
import pytest
import torch
from _graphs import F32, meta, node
from torch import nn

import genie
from genie._plan_exec import run_plan
from genie.graph import CONST, INPUT, Graph, Ref, content_digest, written_sources
from genie.runtime._remote import RemoteBackend
from genie.server._job import check_untouched
from genie.server._residency import ConstantPool

server, remote, any_backend = fx.server, fx.remote, fx.any_backend  # fixtures, by name
DEV = "remote_accelerator:0"


# -- item 4: one client poisons another's weights ------------------------------------------------
W = torch.arange(16, dtype=F32) + 0.5
D = content_digest(W)


def _hostile(kind: str) -> tuple[Graph, list[torch.Tensor], torch.Tensor]:
    """(graph writing the shared weight W without declaring it, its inputs, what it returns)."""
    w = node(0, CONST, D, outputs=[meta(16)])
    if kind == "add_":
        add = node(1, "aten.add_.Tensor", Ref(0), 100.0, outputs=[meta(16)])
        return Graph([w, add], [Ref(1)]), [], W + 100
    if kind == "copy_":
        z = torch.full((16,), -1.0)
        return (Graph([w, node(1, INPUT, 0, outputs=[meta(16)]),
                       node(2, "aten.copy_.default", Ref(0), Ref(1), outputs=[meta(16)])], [Ref(2)]), [z], z)
    if kind == "index_put_":
        idx, vals = torch.tensor([0, 5]), torch.tensor([9.0, 9.0])
        want = W.clone().index_put_([idx], vals)
        return (Graph([w, node(1, INPUT, 0, outputs=[meta(2, dtype=torch.int64)]),
                       node(2, INPUT, 1, outputs=[meta(2)]),
                       node(3, "aten.index_put_.default", Ref(0), [Ref(1)], Ref(2), outputs=[meta(16)])],
                      [Ref(3)]), [idx, vals], want)
    if kind == "view_mul_":
        return (Graph([w, node(1, "aten.view.default", Ref(0), [4, 4], outputs=[meta(4, 4)]),
                       node(2, "aten.mul_.Scalar", Ref(1), -1.0, outputs=[meta(4, 4)])], [Ref(0)]), [], -W)
    if kind == "unsafe_view_add_":
        return (Graph([w, node(1, "aten._unsafe_view.default", Ref(0), [4, 4], outputs=[meta(4, 4)]),
                       node(2, "aten.add_.Tensor", Ref(1), 5.0, outputs=[meta(4, 4)])], [Ref(0)]), [], W + 5)
    if kind == "split_add_":
        return (Graph([w, node(1, "aten.split.Tensor", Ref(0), 8, outputs=[meta(8), meta(8)], multi=True),
                       node(2, "aten.add_.Tensor", Ref(1, 1), 7.0, outputs=[meta(8)])], [Ref(0)]), [],
                torch.cat([W[:8], W[8:] + 7]))
    if kind == "set_add_":
        return (Graph([w, node(1, "aten.clone.default", Ref(0), outputs=[meta(16)]),
                       node(2, "aten.set_.source_Tensor", Ref(1), Ref(0), outputs=[meta(16)]),
                       node(3, "aten.add_.Tensor", Ref(1), 1.0, outputs=[meta(16)])], [Ref(0)]), [], W + 1)
    if kind == "out=":
        x = torch.ones(16)
        return (Graph([w, node(1, INPUT, 0, outputs=[meta(16)]),
                       node(2, "aten.add.out", Ref(1), Ref(1), out=Ref(0), outputs=[meta(16)])], [Ref(0)]),
                [x], x + x)
    if kind == "batch_norm":  # writes running_mean/var in training, under a schema that says nothing
        x = torch.randn(8, 16)
        want = W.clone()
        torch.ops.aten.native_batch_norm.default(x, None, None, want, W.clone(), True, 0.5, 1e-5)
        return (Graph([w, node(1, INPUT, 0, outputs=[meta(8, 16)]),
                       node(2, "aten.native_batch_norm.default", Ref(1), None, None, Ref(0), Ref(0), True,
                            0.5, 1e-5, outputs=[meta(8, 16), meta(16), meta(16)], multi=True)],
                      [Ref(0)]), [x], None)
    raise AssertionError(kind)


def _read_w() -> Graph:
    return Graph([node(0, CONST, D, outputs=[meta(16)]),
                  node(1, "aten.mul.Tensor", Ref(0), 1.0, outputs=[meta(16)])], [Ref(1)])


HOSTILE = ["add_", "copy_", "index_put_", "view_mul_", "unsafe_view_add_", "split_add_", "set_add_", "out=",
           "batch_norm"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_writes_are_derived_by_the_schema(kind):
    graph, _, _ = _hostile(kind)
    assert all(not n.writes for n in graph.nodes)  # the client declared nothing
    assert written_sources(graph) == ([D], False)


def test_a_view_behind_an_output_index_the_metadata_hides_is_still_a_view():
    graph = Graph([node(0, CONST, D, outputs=[meta(16)]),
                   node(1, "aten.split.Tensor", Ref(0), 8, outputs=[meta(8)], multi=True),
                   node(2, "aten.add_.Tensor", Ref(1, 1), 7.0, outputs=[meta(8)])], [Ref(0)])
    assert written_sources(graph) == ([D], False)


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_client_cannot_poison_a_shared_weight(server, kind):
    a = RemoteBackend(server.address, server.token)
    b = RemoteBackend(server.address, server.token)
    try:
        (got,) = a.run(_read_w(), [], fetch=[0], keep=[], constants={D: W}).fetched
        torch.testing.assert_close(got, W)
        graph, inputs, want = _hostile(kind)
        (mine,) = b.run(graph, inputs, fetch=[0], keep=[], constants={D: W}).fetched
        if want is not None:  # the hostile program did write: to its own copy
            torch.testing.assert_close(mine, want)
        else:
            assert not torch.equal(mine, W)
        (again,) = a.run(_read_w(), [], fetch=[0], keep=[], constants={D: W}).fetched
        torch.testing.assert_close(again, W)  # client A still reads the weight it uploaded
    finally:
        a.close()
        b.close()


def test_an_unpredicted_write_to_a_shared_constant_fails_the_run_and_drops_it():
    pool = ConstantPool()
    w = torch.zeros(4)
    pool.put("d", w, lambda t: t)
    versions = {"d": pool["d"]._version}
    check_untouched(pool, versions)  # nothing written: nothing happens
    assert "d" in pool
    pool["d"].view(2, 2).add_(1)  # as an op missing from the schema tables would
    with pytest.raises(genie.RemoteExecutionError, match="written in place"):
        check_untouched(pool, versions)
    assert "d" not in pool and pool.const_bytes == 0


# -- item 12: equal buffers are distinct values ----------------------------------------------------
class TwoZeros(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a", torch.zeros(8))
        self.register_buffer("b", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.a.add_(x)
        return self.a * 1 + self.b * 10



def test_equal_buffers_written_through_one_stay_distinct(any_backend):
    x = torch.randn(8)
    eager = TwoZeros()
    want = eager(x)
    m = TwoZeros().to(DEV)
    out = m(x.to(DEV)).cpu()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(m.a.cpu(), eager.a)
    torch.testing.assert_close(m.b.cpu(), eager.b)  # still zero


async def test_equal_buffers_in_a_capture_are_two_constants(any_backend):
    x, m = torch.randn(8), TwoZeros()
    with genie.capture():
        out = m(x)
    graph = genie.get_graph()
    consts = [n for n in graph.nodes if n.op == CONST]
    assert len(consts) == 2 and consts[0].args == consts[1].args  # two values, one upload
    got = await genie.execute(graph, x)
    assert len(got) == 1 and out.shape == got[0].shape
    torch.testing.assert_close(got[0], TwoZeros()(x))


def test_two_const_nodes_of_one_digest_one_written_are_two_values(any_backend):
    z = torch.zeros(16)
    d = content_digest(z)
    graph = Graph([node(0, CONST, d, outputs=[meta(16)]), node(1, CONST, d, outputs=[meta(16)]),
                   node(2, "aten.add_.Tensor", Ref(0), 3.0, outputs=[meta(16)]),
                   node(3, "aten.mul.Tensor", Ref(1), 1.0, outputs=[meta(16)])], [Ref(2), Ref(3)])
    written, shown = any_backend.run(graph, [], fetch=[0, 1], keep=[], constants={d: z}).fetched
    torch.testing.assert_close(written, torch.full((16,), 3.0))
    torch.testing.assert_close(shown, z)
    assert not z.any()  # the caller's tensor (in process: the executor's constant) is untouched


def test_fresh_batchnorms_train_like_eager_over_the_wire(any_backend):
    torch.manual_seed(0)
    eager = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3)).train()  # equal fresh stats
    remote = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3)).train().to(DEV)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5)
        torch.testing.assert_close(remote(x.to(DEV)).cpu(), eager(x), rtol=1e-4, atol=1e-5)
    for r, e in zip(remote, eager, strict=True):
        torch.testing.assert_close(r.running_mean.cpu(), e.running_mean)
        torch.testing.assert_close(r.running_var.cpu(), e.running_var)
        assert int(r.num_batches_tracked.cpu()) == 3


# -- item 14: side effects are never dropped ---------------------------------------------------------
def test_batchnorm_updates_running_stats_when_its_output_is_discarded(any_backend):
    torch.manual_seed(0)
    eager, bn = nn.BatchNorm1d(4).train(), nn.BatchNorm1d(4).train().to(DEV)
    other = torch.ones(3).to(DEV)
    for _ in range(3):
        x = torch.randn(8, 4)
        eager(x)
        bn(x.to(DEV))  # result unused
        torch.testing.assert_close((other * 2).cpu(), torch.full((3,), 2.0))  # an unrelated run
    torch.testing.assert_close(bn.running_mean.cpu(), eager.running_mean)
    torch.testing.assert_close(bn.running_var.cpu(), eager.running_var)
    assert int(bn.num_batches_tracked.cpu()) == 3


def test_a_write_to_a_live_buffer_runs_when_nothing_reads_it(any_backend):
    buf = torch.zeros(4).to(DEV)
    unrelated = torch.ones(2).to(DEV)
    for step in range(1, 4):
        buf.add_(1.0)  # nothing reads the result
        (unrelated + step).cpu()  # this run must carry the write anyway
    torch.testing.assert_close(buf.cpu(), torch.full((4,), 3.0))


# -- item 15: a remote tensor passed to execute ------------------------------------------------------
def _f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ w) + 1


async def test_execute_takes_a_remote_tensor_and_later_calls_are_unaffected(any_backend):
    graph = genie.trace(_f, torch.randn(2, 4), torch.randn(4, 3))
    x, w = torch.randn(2, 4), torch.randn(4, 3)
    lazy = x.to(DEV) * 1  # still pending
    (got,) = await genie.execute(graph, lazy, w)
    torch.testing.assert_close(got, _f(x, w))
    kept = x.to(DEV) * 2
    kept.cpu()  # now kept on the executor
    (got,) = await genie.execute(graph, kept, w)
    torch.testing.assert_close(got, _f(2 * x, w))
    for _ in range(2):  # the plan slot and template state are intact
        x2 = torch.randn(2, 4)
        (got,) = await genie.execute(graph, x2, w)
        torch.testing.assert_close(got, _f(x2, w))


async def test_a_remote_input_to_a_raw_run_is_a_clear_error_that_leaves_the_connection_usable(remote):
    graph = genie.trace(_f, torch.randn(2, 4), torch.randn(4, 3))
    x, w = torch.randn(2, 4), torch.randn(4, 3)
    with pytest.raises(TypeError, match="host tensors"):
        await remote.run_async(graph, [x.to(DEV) * 1, w], fetch=[0], keep=[], constants=graph.constants)
    for _ in range(2):
        (got,) = (await remote.run_async(graph, [x, w], fetch=[0], keep=[],
                                         constants=graph.constants)).fetched
        torch.testing.assert_close(got, _f(x, w))


def test_run_plan_writes_to_copies_never_to_the_callers_constants():
    w = torch.zeros(4)

    def fn(x: torch.Tensor) -> torch.Tensor:
        w.add_(x)  # the CPU tensor is a constant of the trace: one node for every use of it
        return w * x + 1

    plan = genie.schedule(genie.trace(fn, torch.ones(4)))
    for _ in range(2):  # the second run starts from the captured value again
        (out,) = run_plan(plan, [torch.ones(4)]).outputs
        torch.testing.assert_close(out, torch.full((4,), 2.0))
    assert not w.any()


@pytest.mark.parametrize("make_view", [lambda w: w.view(8), lambda w: w[2:6], lambda w: w.t()[0]])
def test_a_kept_view_of_a_weight_written_in_place_does_not_reach_other_clients(server, make_view):
    """A run may keep a constant itself (or a view of it) as a value; a later in-place write through
    that handle must write the client's own copy, never the weight every client shares."""
    w = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    with fx.using(RemoteBackend(server.address, server.token)):
        v = make_view(w.to(DEV))
        v.cpu()  # kept on the server, as it is (no op made a new value)
        v.add_(100)
        torch.testing.assert_close(v.cpu(), make_view(w) + 100)
    with fx.using(RemoteBackend(server.address, server.token)):
        torch.testing.assert_close((w.to(DEV) * 1).cpu(), w)  # the same bytes: the shared weight


def test_laying_out_a_view_of_a_constant_never_touches_the_constant(server):
    """A slice of an uploaded constant whose declared strides differ from the server's only in a
    dimension of size 1 is given the declared layout as a new view: the constant itself (every
    client's) is not changed in place, so the run neither fails the version check nor drops it."""
    with fx.using(RemoteBackend(server.address, server.token)) as b:
        host = torch.arange(64.0).reshape(4, 16)[:1, :8]  # strides (16, 1) on a [1, 8]
        x = host.to("remote_accelerator:0")
        for _ in range(2):  # the second run still finds the constant where the first left it
            got = (x[:, 2:6] * 2 + x[:, :4]).cpu()
            torch.testing.assert_close(got, host[:, 2:6] * 2 + host[:, :4])
        assert b.server_stats().get("evictions", 0) == 0
