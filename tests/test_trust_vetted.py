"""The trust boundary, part two (issue 17, items 1, 2 and the seeded-op part of 5): only vetted ops
run, indices are checked against what they index, writes through aliases that schemas hide are
refused by storage, and every random op draws from its own run's seed.

The server tests speak as a hostile client would: graphs built node by node (``_graphs.node``) and
sent as they are (``RemoteBackend.run`` forwards any graph), against real ``genie serve``
subprocesses. Each crash finding is checked on a server that must still serve another client after.
"""

from __future__ import annotations

import re
import threading

import _server_fixtures as fx
import pytest
import torch
from _graphs import F32, meta, node
from _server_fixtures import check_served

import genie
from genie.graph import (
    CONST,
    INPUT,
    VETTED,
    Graph,
    Node,
    Ref,
    TensorMeta,
    check_vetted,
    content_digest,
    graph_from_bytes,
    overload,
    registry,
    vetted_refusal,
)
from genie.graph._ops import NOT_VETTED, refusal
from genie.graph._vetted import REASONS
from genie.runtime._remote import RemoteBackend
from genie.server._bounds import Bound, signature
from genie.server._checks import INDEX_CHECKS, INDEX_LIKE, NOT_INDICES, packet
from genie.server._rng import DECOMPOSED, _under_lock, seeded_call

I64 = torch.int64


@pytest.fixture(scope="module")
def vetted():
    """A server with the default op policy; tests that may crash a server on old code use it too,
    and check after each that it still serves."""
    with fx.serving() as s:
        yield s


@pytest.fixture(scope="module")
def all_ops():
    """A server started with ``--ops all``: the storage guard, not the allowlist, stops alias writes."""
    with fx.serving("--ops", "all") as s:
        yield s


def client(server: fx.ServerProcess) -> RemoteBackend:
    return RemoteBackend(server.address, server.token)


def still_serving(server: fx.ServerProcess, *backends: RemoteBackend) -> None:
    """The server process lives, each given connection still computes, and so does a new one."""
    assert server.proc.poll() is None, f"the server died: {server.stderr_tail()}"
    for b in backends:
        check_served(b)
    with fx.using(client(server)) as fresh:
        check_served(fresh)


# -- item 1: the vetted table --------------------------------------------------------------------------
def test_every_vetted_op_is_a_registry_op_with_a_reason():
    assert len(VETTED) > 200
    for name, group in VETTED.items():
        assert name in registry(), name
        assert refusal(overload(registry()[name])) is None, name
        assert REASONS.get(group), (name, group)
        assert vetted_refusal(name) is None


def test_every_vetted_op_that_takes_indices_has_a_bounds_check():
    """An index-like tensor argument (indices, offsets, lengths, targets, ...) on a vetted op is
    either checked before the op runs or reviewed as indexing nothing."""
    unchecked = {}
    for name in VETTED:
        if packet(name) in INDEX_CHECKS or packet(name) in NOT_INDICES:
            continue
        args = [a.name for a in overload(registry()[name])._schema.arguments
                if "Tensor" in str(a.type) and INDEX_LIKE.search(a.name)]
        if args:
            unchecked[name] = args
    assert not unchecked


def test_index_checks_name_arguments_their_ops_have():
    seen = 0
    for name in registry():
        check = INDEX_CHECKS.get(packet(name))
        if isinstance(check, Bound):
            names = signature(name)[0]
            if check.index in names:  # an overload without the index (index_fill's Dimname) is unchecked
                seen += 1
                assert check.of in names, name
                assert not isinstance(check.dim, str) or check.dim in names, name
    assert seen > 30


@pytest.mark.parametrize("name", ["aten._ctc_loss.default", "aten._ctc_loss.Tensor",
                                  "aten._ctc_loss_backward.Tensor", "aten._embedding_bag.default",
                                  "aten._embedding_bag_backward.default",
                                  "aten.embedding.default", "aten.nll_loss_forward.default",
                                  "aten.segment_reduce.default", "aten.index.Tensor", "aten.gather.default"])
def test_ops_speech_and_recommendation_use_stay_available(name):
    assert name in VETTED and VETTED[name] == "checked"
    assert packet(name) in INDEX_CHECKS


@pytest.mark.parametrize("name", ["aten._to_sparse.default", "aten._indices.default",
                                  "aten.max_unpool2d.default", "aten._nested_tensor_from_mask.default",
                                  "aten._unsafe_index.Tensor", "aten.unsafe_chunk.default",
                                  "aten.type_as.default"])
def test_unvetted_ops_are_refused_naming_op_and_reason(name):
    with pytest.raises(genie.UnsupportedOpError, match=re.escape(name)) as e:
        check_vetted(["aten.add.Tensor", name, "genie.attention"])
    assert "--ops all" in str(e.value)


def test_not_vetted_reasons_name_real_ops():
    for prefix, why in NOT_VETTED.items():
        assert why and any(n.startswith(prefix) for n in registry()), prefix
        assert not any(n.startswith(prefix) for n in VETTED), prefix


def test_server_refuses_an_unvetted_op_before_anything_runs(vetted):
    graph = Graph([node(0, INPUT, 0, outputs=[meta(4)]),
                   node(1, "aten.type_as.default", Ref(0), Ref(0), outputs=[meta(4)])], [Ref(1)])
    with fx.using(client(vetted)) as b:
        with pytest.raises(genie.UnsupportedOpError, match=r"aten\.type_as\.default.*--ops all"):
            b.run(graph, [torch.randn(4)], fetch=[0], keep=[], constants={})
        still_serving(vetted, b)


def test_ops_all_runs_what_vetted_refuses(all_ops):
    graph = Graph([node(0, INPUT, 0, outputs=[meta(4)]),
                   node(1, "aten.type_as.default", Ref(0), Ref(0), outputs=[meta(4)])], [Ref(1)])
    x = torch.randn(4)
    with fx.using(client(all_ops)) as b:
        (got,) = b.run(graph, [x], fetch=[0], keep=[], constants={}).fetched
    torch.testing.assert_close(got, x)


def test_ops_all_warns_at_start(all_ops):
    assert "WARNING: --ops all" in all_ops.stderr_tail()


# -- item 1: indices, offsets and lengths, checked before the op runs -----------------------------------
def _ctc(targets: torch.Tensor, overload_name: str = "default") -> tuple[Graph, list[torch.Tensor]]:
    log_probs = torch.randn(5, 1, 3).log_softmax(2)
    lengths = ([5], [2]) if overload_name == "default" else (Ref(2), Ref(3))
    nodes = [node(0, INPUT, 0, outputs=[meta(5, 1, 3)]), node(1, INPUT, 1, outputs=[meta(1, 2, dtype=I64)])]
    inputs = [log_probs, targets]
    if overload_name == "Tensor":
        nodes += [node(2, INPUT, 2, outputs=[meta(1, dtype=I64)]),
                  node(3, INPUT, 3, outputs=[meta(1, dtype=I64)])]
        inputs += [torch.tensor([5]), torch.tensor([2])]
    n = len(nodes)
    nodes.append(node(n, f"aten._ctc_loss.{overload_name}", Ref(0), Ref(1), *lengths, 0, False,
                      outputs=[meta(1), meta(1, 5, 5)], multi=True))
    return Graph(nodes, [Ref(n, 0)]), inputs


@pytest.mark.parametrize("overload_name", ["default", "Tensor"])
def test_ctc_loss_with_a_huge_target_id_is_refused_and_the_server_lives(vetted, overload_name):
    """Was a SIGSEGV: aten._ctc_loss with a target id of 10^9 (speech's loss stays available)."""
    with fx.using(client(vetted)) as other, fx.using(client(vetted)) as b:
        check_served(other)
        graph, inputs = _ctc(torch.tensor([[10**9, 1]]), overload_name)
        with pytest.raises(genie.RemoteExecutionError,
                           match=r"_ctc_loss.*targets holds 1000000000, out of bounds"):
            b.run(graph, inputs, fetch=[0], keep=[], constants={})
        ok, inputs = _ctc(torch.tensor([[1, 2]]), overload_name)  # the same op, honest: eager's loss
        (got,) = b.run(ok, inputs, fetch=[0], keep=[], constants={}).fetched
        want = torch.ops.aten._ctc_loss.default(inputs[0], inputs[1], [5], [2], 0, False)[0]
        torch.testing.assert_close(got, want)
        still_serving(vetted, b, other)


def _segments(data_n: int, offsets: torch.Tensor) -> Graph:
    n_out = offsets.numel() - 1
    return Graph([node(0, INPUT, 0, outputs=[meta(data_n)]),
                  node(1, INPUT, 1, outputs=[meta(offsets.numel(), dtype=I64)]),
                  node(2, "aten.segment_reduce.default", Ref(0), "sum", offsets=Ref(1),
                       outputs=[meta(n_out)])],
                 [Ref(2)])


def test_segment_reduce_offsets_past_the_data_are_refused_and_the_server_lives(vetted):
    """Was a SIGSEGV: aten.segment_reduce with offsets of 2^40."""
    with fx.using(client(vetted)) as other, fx.using(client(vetted)) as b:
        offsets = torch.tensor([0, 2**40])
        with pytest.raises(genie.RemoteExecutionError, match="offsets holds 1099511627776, out of bounds"):
            b.run(_segments(4, offsets), [torch.randn(4), offsets], fetch=[0], keep=[], constants={})
        data, ok = torch.randn(4), torch.tensor([0, 1, 4])
        (got,) = b.run(_segments(4, ok), [data, ok], fetch=[0], keep=[], constants={}).fetched
        torch.testing.assert_close(got, torch.stack([data[:1].sum(), data[1:].sum()]))
        still_serving(vetted, b, other)


def test_segment_reduce_cannot_read_another_clients_constant(vetted):
    """Was a cross-client read: offsets [j, j+1, ...] walked past a 4-element tensor into another
    client's private constant, and the sums returned its values one by one."""
    secret = torch.arange(256, dtype=F32) + 4096.5
    d = content_digest(secret)
    a, b = client(vetted), client(vetted)
    try:
        keep = Graph([node(0, CONST, d, outputs=[meta(256)]),
                      node(1, "aten.mul.Tensor", Ref(0), 1.0, outputs=[meta(256)])], [Ref(1)])
        a.run(keep, [], fetch=[], keep=[0], constants={d: secret})  # A's value stays on the server
        offsets = torch.arange(0, 1 << 17, dtype=I64)  # 512 KiB past B's 16 bytes
        with pytest.raises(genie.RemoteExecutionError, match="out of bounds"):
            b.run(_segments(4, offsets), [torch.zeros(4), offsets], fetch=[0], keep=[], constants={})
        still_serving(vetted, a, b)
    finally:
        a.close()
        b.close()


def test_sparse_indices_cannot_be_rewritten_into_a_heap_write(vetted):
    """Was an out-of-bounds heap write: _to_sparse -> _indices -> fill_(2**40) -> _to_dense."""
    graph = Graph([node(0, INPUT, 0, outputs=[meta(4, 4)]),
                   node(1, "aten._to_sparse.default", Ref(0), outputs=[meta(4, 4)]),
                   node(2, "aten._indices.default", Ref(1), outputs=[meta(2, 16, dtype=I64)]),
                   node(3, "aten.fill_.Scalar", Ref(2), 2**40, outputs=[meta(2, 16, dtype=I64)]),
                   node(4, "aten._to_dense.default", Ref(1), outputs=[meta(4, 4)])], [Ref(4)])
    with fx.using(client(vetted)) as other, fx.using(client(vetted)) as b:
        with pytest.raises(genie.UnsupportedOpError, match=r"aten\._(to_sparse|indices|to_dense)"):
            b.run(graph, [torch.ones(4, 4)], fetch=[0], keep=[], constants={})
        still_serving(vetted, b, other)


BIG = 1 << 33
_W, _IDX, _IDX2 = torch.randn(8, 4), torch.tensor([1, BIG]), torch.tensor([[1, BIG]])
R0, R1, R2 = Ref(0), Ref(1), Ref(2)
# case -> (op, inputs, args, declared outputs); each with one index far past what it indexes
OUT_OF_RANGE = {
    "embedding": ("aten.embedding.default", [_W, _IDX], (R0, R1), [meta(2, 4)]),
    "gather": ("aten.gather.default", [_W, _IDX2], (R0, 0, R1), [meta(1, 2)]),
    "index_select": ("aten.index_select.default", [_W, _IDX], (R0, 0, R1), [meta(2, 4)]),
    "index": ("aten.index.Tensor", [_W, _IDX], (R0, [R1]), [meta(2, 4)]),
    "index_put_": ("aten.index_put_.default", [_W, _IDX, torch.ones(4)], (R0, [R1], R2), [meta(8, 4)]),
    "take": ("aten.take.default", [_W, _IDX], (R0, R1), [meta(2)]),
    "scatter_": ("aten.scatter_.value", [_W, _IDX2], (R0, 0, R1, 1.0), [meta(8, 4)]),
    "embedding_bag": ("aten._embedding_bag.default", [_W, _IDX, torch.tensor([0])], (R0, R1, R2),
                      [meta(1, 4), meta(2, dtype=I64), meta(1, dtype=I64), meta(1, dtype=I64)]),
    "nll_loss": ("aten.nll_loss_forward.default", [torch.randn(2, 4), _IDX], (R0, R1, None, 1, -100),
                 [meta(), meta()]),
    "bincount": ("aten.bincount.default", [_IDX], (R0,), [meta(8, dtype=I64)]),
    "repeat_interleave": ("aten.repeat_interleave.Tensor", [_IDX], (R0,), [meta(8, dtype=I64)]),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_out_of_range_indices_are_refused_naming_op_and_value(vetted, case):
    op, inputs, args, outputs = OUT_OF_RANGE[case]
    n = len(inputs)
    graph = Graph([*(node(k, INPUT, k, outputs=[TensorMeta.of(t)]) for k, t in enumerate(inputs)),
                   node(n, op, *args, outputs=outputs, multi=len(outputs) > 1)], [Ref(n)])
    why = "graph declares" if case == "repeat_interleave" else "out of bounds"
    with fx.using(client(vetted)) as b:
        with pytest.raises(genie.RemoteExecutionError, match=rf"{re.escape(op)}.*{why}"):
            b.run(graph, inputs, fetch=[0], keep=[], constants={})
        still_serving(vetted, b)


def test_batch_norm_per_channel_tensors_must_match_the_channels(vetted):
    """Found by the op fuzzer: batch norm reads (and in training writes) one running statistic per
    channel without checking how many the tensors hold: a heap read and write past them."""
    x = torch.randn(2, 4, 3, 3)
    graph = Graph([node(0, INPUT, 0, outputs=[meta(2, 4, 3, 3)]), node(1, INPUT, 1, outputs=[meta(1)]),
                   node(2, INPUT, 2, outputs=[meta(4)]),
                   node(3, "aten.native_batch_norm.default", Ref(0), Ref(2), Ref(2), Ref(2), Ref(1), True,
                        0.1, 1e-5, outputs=[meta(2, 4, 3, 3), meta(4), meta(4)], multi=True)], [Ref(3)])
    with fx.using(client(vetted)) as b:
        with pytest.raises(genie.RemoteExecutionError, match="running_var holds 1 values, but input has 4"):
            b.run(graph, [x, torch.ones(1), torch.ones(4)], fetch=[0], keep=[], constants={})
        still_serving(vetted, b)


@pytest.mark.parametrize("arg", ["memory_format", "dtype", "layout"])
def test_an_enum_argument_must_arrive_as_its_own_type(vetted, arg):
    """Found by the op fuzzer: torch binds a bare int where a memory format (or dtype, layout) goes,
    unchecked, and ``ones_like(x, memory_format=-1)`` corrupted the process for a later op."""
    graph = Graph([node(0, INPUT, 0, outputs=[meta(3)]),
                   node(1, "aten.ones_like.default", Ref(0), **{arg: -1}, outputs=[meta(3)])], [Ref(1)])
    with pytest.raises(genie.ProtocolError, match=f"argument '{arg}' must be a torch"):
        graph_from_bytes(graph.to_bytes())
    with fx.using(client(vetted)) as b:
        with pytest.raises(genie.ProtocolError, match=f"argument '{arg}' must be a torch"):
            b.run(graph, [torch.ones(3)], fetch=[0], keep=[], constants={})
        still_serving(vetted)


# -- item 2: aliases from storage, not schemas -------------------------------------------------------
W = torch.arange(16, dtype=F32) + 0.5
D = content_digest(W)


def _read_w() -> Graph:
    return Graph([node(0, CONST, D, outputs=[meta(16)]),
                  node(1, "aten.mul.Tensor", Ref(0), 1.0, outputs=[meta(16)])], [Ref(1)])


def _alias_write(kind: str) -> Graph:
    """A graph that writes the shared weight W through an alias its schemas hide."""
    w = node(0, CONST, D, outputs=[meta(16)])
    x = node(1, INPUT, 0, outputs=[meta(16)])
    aliases = {
        "unsafe_chunk": node(2, "aten.unsafe_chunk.default", Ref(0), 2, outputs=[meta(8), meta(8)],
                             multi=True),
        "unsafe_split": node(2, "aten.unsafe_split.Tensor", Ref(0), 8, outputs=[meta(8), meta(8)],
                             multi=True),
        "data": node(2, "aten.data.default", Ref(0), outputs=[meta(16)]),
        "type_as": node(2, "aten.type_as.default", Ref(0), Ref(1), outputs=[meta(16)]),
        "broadcast_tensors": node(2, "aten.broadcast_tensors.default", [Ref(0), Ref(1)],
                                  outputs=[meta(16), meta(16)], multi=True),
        "lift": node(2, "aten.lift.default", Ref(0), outputs=[meta(16)]),
        "dropout_eval": node(2, "aten.dropout.default", Ref(0), 0.5, False, outputs=[meta(16)]),
    }
    if kind == "set_data":  # a fresh tensor made to share W's memory, then written
        return Graph([w, x, node(2, "aten.clone.default", Ref(1), outputs=[meta(16)]),
                      node(3, "aten.set_data.default", Ref(2), Ref(0)),
                      node(4, "aten.add_.Tensor", Ref(2), 100.0, outputs=[meta(16)])], [Ref(4)])
    alias = aliases[kind]
    target = Ref(2, 0)
    return Graph([w, x, alias, node(3, "aten.add_.Tensor", target, 100.0, outputs=[alias.outputs[0]])],
                 [Ref(3)])


ALIAS_WRITES = ["unsafe_chunk", "unsafe_split", "data", "set_data", "type_as", "broadcast_tensors", "lift",
                "dropout_eval"]


@pytest.mark.parametrize("kind", ALIAS_WRITES)
def test_a_write_through_a_hidden_alias_never_reaches_a_shared_weight(all_ops, kind):
    """Client B, knowing only W's digest, used to change what A (and a new client C) read."""
    a, b = client(all_ops), client(all_ops)
    try:
        (got,) = a.run(_read_w(), [], fetch=[0], keep=[], constants={D: W}).fetched
        torch.testing.assert_close(got, W)
        with pytest.raises(genie.UnsupportedOpError, match="shares memory with a shared constant"):
            b.run(_alias_write(kind), [torch.zeros(16)], fetch=[0], keep=[], constants={D: W})
        (again,) = a.run(_read_w(), [], fetch=[0], keep=[], constants={D: W}).fetched
        torch.testing.assert_close(again, W)
        with fx.using(client(all_ops)) as c:
            (fresh,) = c.run(_read_w(), [], fetch=[0], keep=[], constants={D: W}).fetched
        torch.testing.assert_close(fresh, W)
        assert a.server_stats()["constants"] >= 1  # refused before the write: W was never dropped
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("kind", ["unsafe_chunk", "type_as", "broadcast_tensors"])
def test_the_vetted_server_refuses_hidden_alias_ops_outright(vetted, kind):
    with fx.using(client(vetted)) as b, pytest.raises(genie.UnsupportedOpError, match=f"aten.{kind}"):
        b.run(_alias_write(kind), [torch.zeros(16)], fetch=[0], keep=[], constants={D: W})


def test_a_declared_write_to_a_weight_still_gets_a_private_copy(vetted):
    """The guard refuses only writes the schemas hid: ``w.view(4, 4).mul_(-1)`` runs on a copy."""
    graph = Graph([node(0, CONST, D, outputs=[meta(16)]),
                   node(1, "aten.view.default", Ref(0), [4, 4], outputs=[meta(4, 4)]),
                   node(2, "aten.mul_.Scalar", Ref(1), -1.0, outputs=[meta(4, 4)])], [Ref(0)])
    with fx.using(client(vetted)) as b:
        (mine,) = b.run(graph, [], fetch=[0], keep=[], constants={D: W}).fetched
        torch.testing.assert_close(mine, -W)
        (shared,) = b.run(_read_w(), [], fetch=[0], keep=[], constants={D: W}).fetched
        torch.testing.assert_close(shared, W)


@pytest.mark.parametrize("n", [64, 256, 1024, 4096])
def test_empty_memory_never_shows_another_clients_values(vetted, n):
    """``empty`` returns what the allocator last held there (on old code, client B read A's freed
    result through it): the server zeroes it first."""
    secret = torch.full((n,), 4242.0)
    d = content_digest(secret)
    make = Graph([node(0, CONST, d, outputs=[meta(n)]),
                  node(1, "aten.add.Tensor", Ref(0), 1.0, outputs=[meta(n)])], [Ref(1)])
    peek = Graph([node(0, "aten.empty.memory_format", [n], dtype=F32, outputs=[meta(n)])], [Ref(0)])
    a, b = client(vetted), client(vetted)
    try:
        for _ in range(5):
            a.run(make, [], fetch=[0], keep=[], constants={d: secret})  # frees an n-float result each time
            (got,) = b.run(peek, [], fetch=[0], keep=[], constants={}).fetched
            assert not bool((got == 4243.0).any()), "B read A's freed result"
            assert not got.any(), "B read memory someone else left behind"
    finally:
        a.close()
        b.close()


def test_memory_a_resize_grows_into_is_zeroed(vetted):
    """``resize_`` to more elements than the storage holds adds memory nobody wrote: zeroed too."""
    graph = Graph([node(0, INPUT, 0, outputs=[meta(2, 3)]),
                   node(1, "aten.clone.default", Ref(0), outputs=[meta(2, 3)]),
                   node(2, "aten.resize_.default", Ref(1), [64, 64], outputs=[meta(64, 64)])], [Ref(2)])
    with fx.using(client(vetted)) as b:
        for _ in range(3):
            (got,) = b.run(graph, [torch.ones(2, 3)], fetch=[0], keep=[], constants={}).fetched
            assert torch.equal(got.flatten()[:6], torch.ones(6)) and not got.flatten()[6:].any()


# -- item 5: random ops draw from their own run's seed ------------------------------------------------
def test_each_random_op_gets_a_generator_of_its_own():
    assert seeded_call("aten.randn.default") is not _under_lock  # randn.generator, the twin
    assert seeded_call("aten.randint.low") is not _under_lock  # randint.low_generator
    assert seeded_call("aten.normal_.default") is not _under_lock  # takes a generator
    assert "aten.native_dropout.default" in DECOMPOSED
    assert seeded_call("aten._scaled_dot_product_flash_attention_for_cpu.default") is _under_lock
    for name in VETTED:  # every vetted random op: a generator, a twin, a rewrite, or the lock
        if VETTED[name] == "random":
            assert callable(seeded_call(name))


def _random_graph(k: int, ops: str) -> Graph:
    """``k`` draws of each kind, each with its own seed: an op without a generator argument (its twin
    takes one), dropout (rewritten over one), ``rand_like`` (a twin too), and a seedless one (a raw
    client's: drawn, not compared, and it must not move the default generator unlocked). With
    ``--ops all``, also ops with no generator anywhere, run under the lock."""
    nodes: list[Node] = []
    outs: list[Ref] = []
    x = meta(4096)

    def add(op: str, args: tuple, outputs: tuple, seed: int | None, **kwargs) -> Ref:
        nodes.append(Node(len(nodes), op, args, kwargs, outputs, len(outputs) > 1, seed=seed))
        ref = Ref(len(nodes) - 1, 0)
        if seed is not None:
            outs.append(ref)
        return ref

    for i in range(k):
        r = add("aten.randn.default", ([4096],), (x,), 100 + i, dtype=F32)
        add("aten.native_dropout.default", (r, 0.5, True), (x, meta(4096, dtype=torch.bool)), 200 + i)
        q = add("aten.rand_like.default", (r,), (x,), 300 + i)
        add("aten.bernoulli.default", (q,), (x,), None)
        if ops == "all":
            add("aten.dropout.default", (r, 0.3, True), (x,), 400 + i)
            add("aten.alpha_dropout.default", (r, 0.3, True), (x,), 500 + i)
    return Graph(nodes, outs)


@pytest.mark.parametrize("ops", ["vetted", "all"])
def test_concurrent_clients_random_results_are_each_reproducible(request, ops):
    """Was: seeded ops without a generator ran under one process-wide ``fork_rng``, so concurrent
    runs changed another client's result (1 time in 201). Each result must equal its seed's."""
    server = request.getfixturevalue("vetted" if ops == "vetted" else "all_ops")
    graph = _random_graph(4, ops)
    fetch = list(range(len(graph.outputs)))
    with fx.using(client(server)) as alone:
        want = alone.run(graph, [], fetch=fetch, keep=[], constants={}).fetched
    assert not torch.equal(want[0], want[3])  # distinct seeds, distinct draws
    wrong: list[str] = []
    start = threading.Barrier(4)

    def hammer(who: int) -> None:
        b = client(server)
        try:
            start.wait()
            for step in range(25):
                got = b.run(graph, [], fetch=fetch, keep=[], constants={}).fetched
                wrong.extend(f"client {who} step {step} output {i}"
                             for i, (g, w) in enumerate(zip(got, want, strict=True)) if not torch.equal(g, w))
        finally:
            b.close()

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} results differed from their seed's: {wrong[:5]}"
