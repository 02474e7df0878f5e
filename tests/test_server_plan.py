"""Plan templates: a graph cut into skeleton + ints + strings, filled back, and predicted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import genie
from genie.graph import INPUT, Graph, Node, Ref, TensorMeta
from genie.graph._template import Template, apply, corrections, predict, split


def decode_like(n: int):
    """A graph shaped like one decode step with a cache of ``n`` positions."""
    w = torch.randn(8, 8)
    cache = torch.randn(1, n, 8)
    step = lambda x, c: torch.cat([c, (x @ w).unsqueeze(1)], 1).softmax(1)[:, -1]  # noqa: E731
    return genie.trace(step, torch.randn(1, 8), cache)


def test_split_and_fill_rebuild_the_same_graph():
    g = decode_like(5)
    parts = split(g)
    assert parts is not None and len(parts.ints) > 0 and len(parts.strs) == 1
    again = Template(parts.skeleton).fill(parts.ints, parts.strs)
    assert again.digest == g.digest


def test_sizes_change_the_ints_not_the_template():
    a, b = split(decode_like(5)), split(decode_like(6))
    assert a.digest == b.digest
    assert not np.array_equal(a.ints, b.ints)
    assert a.strs != b.strs  # another weight: another digest, carried as a string


def test_linear_growth_is_predicted():
    parts = [split(decode_like(n)) for n in (5, 6, 7, 8)]
    idx, _ = corrections(parts[1].ints, predict(parts[0].ints, parts[0].ints))
    assert len(idx) > 0
    for prev, last, now in zip(parts, parts[1:], parts[2:], strict=False):
        idx, vals = corrections(now.ints, predict(last.ints, prev.ints))
        assert len(idx) == 0
        assert np.array_equal(apply(predict(last.ints, prev.ints), idx, vals), now.ints)


def test_fill_checks_what_it_is_given():
    parts = split(decode_like(5))
    t = Template(parts.skeleton)
    with pytest.raises(genie.ProtocolError):
        t.fill(parts.ints[:-1], parts.strs)
    with pytest.raises(genie.ProtocolError):
        apply(parts.ints, np.array([len(parts.ints)], dtype=np.int32), np.array([1]))
    bad = parts.ints.copy()
    bad[:] = 10**6  # refs are not ints of the template, so a filled graph stays well formed or fails
    with pytest.raises(Exception):  # noqa: B017
        t.fill(bad, parts.strs).to_fx()


def test_huge_ints_are_not_templated():
    meta = TensorMeta((2,), (1,), torch.float64)
    g = Graph([Node(0, INPUT, (0,), outputs=(meta,)),
               Node(1, "aten.add.Scalar", (Ref(0), 1 << 70), outputs=(meta,))], [Ref(1)])
    assert split(g) is None


def test_refills_rebuild_only_changed_nodes_and_agree_with_a_full_parse():
    graphs = [decode_like(n) for n in (5, 6, 7, 8)]
    t = Template(split(graphs[0]).skeleton)
    filled = []
    for g in graphs:
        parts = split(g)
        filled.append(t.fill(parts.ints, parts.strs))
        assert filled[-1].digest == g.digest  # incremental refill == what Graph.from_bytes builds
        fresh = Template(parts.skeleton).fill(parts.ints, parts.strs)
        assert fresh.digest == g.digest
    shared = sum(a is b for a, b in zip(filled[1].nodes, filled[2].nodes, strict=True))
    assert 0 < shared < len(filled[1].nodes)
    parts = split(graphs[-1])
    assert t.fill(parts.ints, parts.strs) is filled[-1]  # nothing changed: the same graph
