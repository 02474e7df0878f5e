"""FLOPs and bytes per node, from shapes alone. A table of op -> FLOP formula; everything else costs
one FLOP per output element. Bytes are what the op reads and writes (views move nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from genie.graph import SOURCE_OPS, Graph, Node, Ref
from genie.semantic._match import operands
from genie.semantic._opsets import ADDMM, BMM, CONV, EMBEDDING, EMBEDDING_BAG, MM, NO_DATA, SDPA, SOFTMAX, ops


@dataclass(frozen=True, slots=True)
class NodeCost:
    flops: int
    bytes: int


@dataclass(frozen=True)
class GraphCost:
    nodes: tuple[NodeCost, ...]  # by node id
    flops: int
    bytes: int

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved: low means memory-bound (decode), high compute-bound (prefill)."""
        return self.flops / self.bytes if self.bytes else 0.0

    def of(self, node_id: int) -> NodeCost:
        return self.nodes[node_id]

    def __str__(self) -> str:
        return f"{_si(self.flops)}FLOP, {_si(self.bytes)}B moved ({self.intensity:.1f} FLOP/B)"


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} "


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _shape(g: Graph, v: object) -> tuple[int, ...]:
    return g.meta(v).shape if type(v) is Ref else ()


def _matmul(g: Graph, n: Node) -> int:
    a, b = (r for r in operands(g)[n.id] if len(g.meta(r).shape) >= 2) if n.op not in ADDMM else \
        (n.args[1], n.args[2])
    sa, out = _shape(g, a), n.outputs[0].shape
    return 2 * _numel(out) * sa[-1]


def _conv(g: Graph, n: Node) -> int:
    w = _shape(g, n.args[1])
    return 2 * _numel(n.outputs[0].shape) * _numel(w[1:])


def _attention(g: Graph, n: Node) -> int:
    q, k = _shape(g, n.args[0]), _shape(g, n.args[1])
    b, h, lq, d = q
    return 4 * b * h * lq * k[-2] * d + 5 * b * h * lq * k[-2]


def _conv_bn_act(g: Graph, n: Node) -> int:
    return _conv(g, n) + 4 * _numel(n.outputs[0].shape)


def _per_elem(k: int) -> Callable[[Graph, Node], int]:
    return lambda g, n: k * _numel(n.outputs[0].shape)


def _per_input_elem(g: Graph, n: Node) -> int:
    refs = operands(g)[n.id]
    return _numel(_shape(g, refs[0])) if refs else 0


def _embedding_bag(g: Graph, n: Node) -> int:
    return _numel(_shape(g, n.args[1])) * _shape(g, n.args[0])[-1]


FLOPS: dict[str, Callable[[Graph, Node], int]] = {
    **dict.fromkeys(MM | ADDMM | BMM | ops("baddbmm.default", "linear.default"), _matmul),
    **dict.fromkeys(CONV, _conv),
    **dict.fromkeys(SDPA | {"genie.attention", "genie.decode_attention"}, _attention),
    "genie.conv2d_bn_act": _conv_bn_act,
    **dict.fromkeys(SOFTMAX, _per_elem(5)),
    **dict.fromkeys(ops("native_layer_norm.default", "layer_norm.default", "rms_norm.default"), _per_elem(8)),
    **dict.fromkeys(ops("native_batch_norm.default", "_native_batch_norm_legit_no_training.default"),
                    _per_elem(4)),
    **dict.fromkeys(ops("sum.dim_IntList", "mean.dim", "amax.default", "var.correction", "sum.default",
                        "mean.default"), _per_input_elem),
    **dict.fromkeys(EMBEDDING | ops("index_select.default", "gather.default"), lambda g, n: 0),
    **dict.fromkeys(EMBEDDING_BAG, _embedding_bag),
    **dict.fromkeys(ops("gelu.default", "silu.default", "tanh.default", "erf.default", "exp.default"),
                    _per_elem(4)),
}


def node_cost(g: Graph, n: Node) -> NodeCost:
    if n.op in SOURCE_OPS or n.op in NO_DATA or not n.outputs:
        return NodeCost(0, 0)
    fn = FLOPS.get(n.op)
    try:
        flops = fn(g, n) if fn is not None else _numel(n.outputs[0].shape)
    except (ValueError, IndexError, TypeError):  # an unusual spelling: count one per element
        flops = _numel(n.outputs[0].shape)
    if n.op in EMBEDDING or n.op in EMBEDDING_BAG:  # gathers rows: reads what it writes, not the table
        read = sum(g.meta(r).nbytes for r in operands(g)[n.id][1:]) + n.outputs[0].nbytes
    else:
        read = sum(g.meta(r).nbytes for r in set(operands(g)[n.id]))
    written = sum(m.nbytes for m in n.outputs)
    return NodeCost(int(flops), int(read + written))


def graph_cost(g: Graph) -> GraphCost:
    per = tuple(node_cost(g, n) for n in g.nodes)
    return GraphCost(per, sum(c.flops for c in per), sum(c.bytes for c in per))
