"""Graph IR: digest, wire form, printing, edges."""

import pytest
import torch

import genie
from genie.graph import CONST, Graph, Template, split

DEV = "remote_accelerator:0"


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()


def test_digest_equal_for_same_structure_and_changes_with_shape_weights_structure():
    m = _mlp()
    d1 = genie.trace(m, torch.randn(4, 8)).digest
    assert genie.trace(m, torch.randn(4, 8)).digest == d1  # same shapes, new values
    assert genie.trace(m, torch.randn(5, 8)).digest != d1  # shape
    assert genie.trace(_mlp(seed=1), torch.randn(4, 8)).digest != d1  # weights
    assert genie.trace(lambda x: m(x).relu(), torch.randn(4, 8)).digest != d1  # structure


def test_wire_round_trip_is_exact_and_pickle_free():
    m = _mlp()
    g = genie.trace(lambda x: (m(x).softmax(-1), x.sum(0)), torch.randn(3, 8))
    data = g.to_bytes()
    assert b"pickle" not in data and not data.startswith(b"\x80")
    h = Graph.from_bytes(data)
    assert h.digest == g.digest and len(h.nodes) == len(g.nodes)
    assert not h.constants and len(data) < 4096  # weights travel on their own, by digest
    h.constants = g.constants
    assert str(h) == str(g)
    x = torch.randn(3, 8)
    for a, b in zip(g.to_fx()(x), h.to_fx()(x), strict=True):
        torch.testing.assert_close(a, b)


def test_one_codec_writes_the_wire_form_and_the_template_skeleton():
    """A template's skeleton is the wire form with holes: filling its holes gives the very bytes
    ``to_bytes`` writes, and its nodes parse back to the same graph."""
    g = genie.trace(lambda x: (x.view(2, 6) * 3).sum(1), torch.randn(3, 4))
    parts = split(g)
    filled = Template(parts.skeleton).fill(parts.ints, parts.strs)
    assert filled.to_bytes() == g.to_bytes() and str(filled) == str(g)
    assert filled.digest == g.digest


@pytest.mark.parametrize("bad", [b"", b"GNG1", b"XXXX\x00\x00\x00\x00", b"GNG1\xff\x00\x00\x00{}",
                                 b"GNG1\x02\x00\x00\x00{}", b'GNG1\x0e\x00\x00\x00{"nodes":[[1]]}'])
def test_malformed_graph_bytes_raise_protocol_error(bad):
    with pytest.raises(genie.ProtocolError):
        Graph.from_bytes(bad)


def test_print_is_readable():
    g = genie.trace(_mlp(), torch.randn(2, 8))
    text = str(g)
    assert text.startswith("genie.Graph(")
    assert "aten.addmm.default" in text and "genie.const" in text and "return" in text
    assert "float32[2, 2]" in text


def test_mutation_edges_order_writes_through_views():
    def fn(x):
        y = x.clone()
        v = y[0]
        s = y.sum()  # reads y before the write
        v.add_(1)  # writes y's storage through a view
        return y * 2, s

    g = genie.trace(fn, torch.randn(3, 3))
    by_op = {n.op: n.id for n in g.nodes}
    add_, total, mul = by_op["aten.add_.Tensor"], by_op["aten.sum.default"], by_op["aten.mul.Tensor"]
    assert total in g.dependencies[add_] and total not in {r.node for r in g.nodes[add_].refs()}
    assert add_ in g.dependencies[mul]  # read after write, through the base
    assert g.nodes[add_].writes
    x = torch.randn(3, 3)
    want_y, want_s = fn(x.clone())
    got_y, got_s = g.to_fx()(x)
    torch.testing.assert_close(got_y, want_y)
    torch.testing.assert_close(got_s, want_s)


def test_constants_are_named_by_content():
    m = _mlp()
    g = genie.trace(m, torch.randn(2, 8))
    consts = [n for n in g.nodes if n.op == CONST]
    assert len({n.args[0] for n in consts}) == 4
    m2 = _mlp()
    g2 = genie.trace(m2, torch.randn(2, 8))
    assert set(g2.constants) == set(g.constants)
