"""Which runs may compute on the event loop: only those whose cost is bounded by a few KiB, proven
from the graph before they run, whatever the client declared.

A thread hop costs more than a tiny run (~100 us each way under load), so a CPU run of at most
TINY_NODES nodes that touches at most TINY_BYTES runs inline. The declared sizes are the client's
word, so "touches at most TINY_BYTES" is proven by induction over the graph, not assumed:

- every source is as declared: inputs are checked exactly when bound; a constant or a kept value
  must have its declared shape and dtype now;
- every computed node's declared outputs are what its op makes from its declared inputs: a
  pointwise op (torch's ``pointwise`` tag) makes the broadcast of its tensor arguments; any other
  op was run once on the meta device with those declared inputs and arguments, in a worker thread
  (``confirm``), and the answer is cached server-wide under the (op, declared inputs, arguments)
  the server derived itself. A node never confirmed yet sends its run to a worker thread, which
  confirms it for next time; an op the meta device cannot size (its output depends on values, as
  ``nonzero``'s does) never runs inline.

Then each op's real inputs have their declared shapes, so its outputs do too (and ``check_output``
holds every output to its declared bytes as the run goes). Declared metas are non-negative and
bounded (``_memory.check_metas``, when the graph was read), so the byte count cannot be fooled.

Call tree::

    runs_inline(job, cuda, pool, residents) -> (inline?, nodes to confirm)   on the event loop
    confirm(graph, nodes)                                                     in a worker thread
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from functools import cache
from typing import Any

import torch

from genie._errors import UnsupportedOpError
from genie.graph import CONST, INPUT, RESIDENT, SOURCE_OPS, Graph, Node, Ref, TensorMeta, map_refs, resolve_op
from genie.server._memory import meta_extent

TINY_NODES = 32  # a run this small (in nodes and in bytes touched) may run on the event loop
TINY_BYTES = 64 << 10
CONFIRMED_MAX = 8192  # (op, declared inputs, arguments) answers kept, least recently used first

_confirmed: OrderedDict[tuple, bool] = OrderedDict()
_lock = threading.Lock()


def runs_inline(job: Any, cuda: bool, constants: Mapping[str, torch.Tensor],
                residents: Mapping[int, torch.Tensor]) -> tuple[bool, list[Node]]:
    """(whether ``job`` may run on the event loop, the nodes whose confirmation would let it): a CPU
    run with no stages, at most TINY_NODES nodes and TINY_BYTES declared, every source as declared
    and every computed node's outputs confirmed (see the module docstring). ``constants.peek``
    looks a constant up without touching the pool's order."""
    graph: Graph = job.graph
    nodes = graph.nodes
    if cuda or job.schedule is not None or job.inbound is not None or len(nodes) > TINY_NODES:
        return False, []
    total = 0
    for n in nodes:
        total += _declared_bytes(n)
    if total > TINY_BYTES:
        return False, []
    unknown: list[Node] = []
    for n in nodes:
        if n.op == INPUT:
            continue  # bound exactly to their declared shape and dtype (graph.check_input)
        if n.op in (CONST, RESIDENT):
            t = constants.peek(n.args[0]) if n.op == CONST else residents.get(n.args[0])  # type: ignore[attr-defined]
            if t is None or len(n.outputs) != 1 or not _as_declared(t, n.outputs[0]):
                return False, []
            continue
        producers = tuple(nodes[r.node] for r in n.refs())
        cached = _held.get(n)
        if cached is not None and _same(cached[1], producers):
            held: bool | None = cached[0]
        else:  # a template fill may reuse a node whose inputs were rebuilt: its own answer then
            held = outputs_hold(graph, n)
            if held is not None:
                _held[n] = (held, producers)
        if held is False:
            return False, []
        if held is None:
            unknown.append(n)
    return not unknown, unknown


# per node (template fills share nodes): its declared bytes; whether its outputs hold, and the nodes
# it read then (a node's op, arguments and declarations never change, but what it reads may)
_bytes: weakref.WeakKeyDictionary[Node, int] = weakref.WeakKeyDictionary()
_held: weakref.WeakKeyDictionary[Node, tuple[bool, tuple[Node, ...]]] = weakref.WeakKeyDictionary()


def _same(a: tuple[Node, ...], b: tuple[Node, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _declared_bytes(n: Node) -> int:
    got = _bytes.get(n)
    if got is None:
        got = _bytes[n] = sum(max(meta_extent(m), m.nbytes) for m in n.outputs)
    return got


def _as_declared(t: torch.Tensor, m: TensorMeta) -> bool:
    return t.dtype == m.dtype and tuple(t.shape) == m.shape


def outputs_hold(graph: Graph, node: Node) -> bool | None:
    """Whether ``node``'s declared outputs are what its op makes from its declared inputs: True,
    False, or None when not known yet (``confirm`` finds out)."""
    if node.op in SOURCE_OPS:
        return True
    if _pointwise(node.op):
        return _broadcast_holds(graph, node)
    key = _key(graph, node)
    if key is None:
        return False
    with _lock:
        held = _confirmed.get(key)
        if held is not None:
            _confirmed.move_to_end(key)
        return held


def confirm(graph: Graph, nodes: list[Node]) -> None:
    """Run each of ``nodes`` on the meta device with its declared inputs and remember whether it
    makes what it declares. In a worker thread: a meta kernel can take a millisecond."""
    for n in nodes:
        key = _key(graph, n)
        if key is None:
            continue
        held = _meta_holds(graph, n)
        with _lock:
            _confirmed[key] = held
            _confirmed.move_to_end(key)
            while len(_confirmed) > CONFIRMED_MAX:
                _confirmed.popitem(last=False)


@cache
def _pointwise(op: str) -> bool:
    try:
        fn = resolve_op(op)
    except UnsupportedOpError:
        return False
    return torch.Tag.pointwise in getattr(fn, "tags", ())


def _broadcast_holds(graph: Graph, node: Node) -> bool:
    """A pointwise op makes the broadcast shape of its tensor arguments (all at the top level)."""
    shapes = []
    for v in (*node.args, *node.kwargs.values()):
        if type(v) is Ref:
            shapes.append(graph.meta(v).shape)
        elif isinstance(v, (list, tuple)) and any(type(x) is Ref for x in v):
            return False  # a list of tensors: not the plain pointwise form
    shape = _broadcast(shapes)
    return shape is not None and bool(node.outputs) and all(m.shape == shape for m in node.outputs)


def _broadcast(shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The broadcast of ``shapes``, or None when they do not broadcast (torch's rule; a fraction of
    ``torch.broadcast_shapes``' cost)."""
    out = [1] * max((len(s) for s in shapes), default=0)
    for s in shapes:
        for i, d in enumerate(s, len(out) - len(s)):
            if d != 1:
                if out[i] not in (1, d):
                    return None
                out[i] = d
    return tuple(out)


def _key(graph: Graph, node: Node) -> tuple | None:
    """(op, arguments with each tensor as its declared meta): hashable, or None."""
    def meta(r: Ref) -> TensorMeta:
        return graph.meta(r)

    try:
        args = _frozen(map_refs(node.args, meta))
        kwargs = tuple(sorted((k, _frozen(map_refs(v, meta))) for k, v in node.kwargs.items()))
        key = (node.op, args, kwargs, node.outputs)
        hash(key)
    except TypeError:
        return None
    return key


def _frozen(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    if isinstance(v, dict):
        raise TypeError("unhashable")
    return v


def _meta_holds(graph: Graph, node: Node) -> bool:
    def fake(r: Ref) -> torch.Tensor:
        m = graph.meta(r)
        return torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device="meta")

    try:
        fn = resolve_op(node.op)
        args = map_refs(node.args, fake)
        kwargs = {k: map_refs(v, fake) for k, v in node.kwargs.items()}
        if "device" in kwargs or not node.refs():  # a factory makes its output on the meta device too
            if not any(a.name == "device" and a.kwarg_only for a in fn._schema.arguments):
                return False  # it could not be told to: never run it for real here
            kwargs["device"] = torch.device("meta")
        kwargs.pop("pin_memory", None)
        out = fn(*args, **kwargs)
    except Exception:  # cannot be sized from metadata alone: never inline
        return False
    got = [out] if isinstance(out, torch.Tensor) else \
        [o for o in out if isinstance(o, torch.Tensor)] if isinstance(out, (tuple, list)) else []
    if any(isinstance(o, torch.Tensor) and o.device.type != "meta" for o in got):
        return False
    declared = node.outputs
    return len(got) <= len(declared) and all(
        tuple(t.shape) == m.shape and t.numel() * t.element_size() <= max(meta_extent(m), m.nbytes)
        for t, m in zip(got, declared, strict=False))
