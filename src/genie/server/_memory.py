"""A run's memory, predicted from its graph before it runs, and the checks that keep the prediction
honest while it runs (the graph's metadata comes from the client, who may lie).

Call tree::

    predict(graph, constant_bytes) -> Prediction      replay the interpreter on metadata alone:
      a computed node allocates its outputs, unless its op's schema says an output aliases an
      argument (a view, or an in-place op's return); a storage is freed once every value on it
      has had its last reader (as Interpreter.step frees); an input is a fresh copy (on the CPU,
      with ``inputs_held``, it is used where it was received: counted as a frame); a constant
      the run writes to is copied first (see _job)
    check_metas(graph)                                 always, when a graph is read: every declared
      shape, stride and offset non-negative and bounded (the predictor, the inline rule and the
      size checks below do arithmetic on them)
    check_sizes(graph)                                 under a memory limit, before running: an op
      whose output size comes from its arguments (a factory such as ``empty``, ``new_zeros``,
      ``repeat``) runs on the meta device first and must make what its node declares
    check_output(node, value)                          after each node runs: no more tensors nor
      bytes than declared, so a lie costs at most the one op that told it

View-ness comes from the op schemas, never from the client's storage ids: those are the client's word.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

import torch

from genie import graph
from genie._errors import RemoteExecutionError, RemoteProtocolError, UnsupportedOpError
from genie.graph import CONST, INPUT, RESIDENT, Graph, Node, Ref, TensorMeta, map_refs, resolve_op


@dataclass(frozen=True, slots=True)
class Prediction:
    peak: int  # bytes the run allocates that are alive at once, at most
    copies: int  # of that, constants the run writes to (each copied once, alive all run)


MAX_SIZE = 1 << 48  # a declared dim, stride or offset: far past any memory, safe in int64 arithmetic
MAX_NDIM = 64
MAX_VALUE_BYTES = 1 << 50  # bytes one declared value may reach
_SANE: weakref.WeakSet[Node] = weakref.WeakSet()  # nodes already checked (template fills share them)


def check_metas(graph: Graph) -> None:
    """RemoteProtocolError unless every value ``graph`` declares has non-negative, bounded sizes,
    strides and offset. Run on every graph read, memory limit or not: what is decided from the
    declared metadata (the predicted peak, which runs are small enough for the event loop) is only
    as sound as its arithmetic, and a negative size once made a huge run look tiny."""
    for n in graph.nodes:
        if n in _SANE:
            continue
        for m in n.outputs:
            if not _sane(m):
                raise RemoteProtocolError(
                    f"node {n.id} ({n.op}) declares a value of shape {list(m.shape)!s:.80}, stride "
                    f"{list(m.stride)!s:.80} and offset {m.offset!s:.20}: sizes, strides and offsets "
                    f"must be non-negative ints under 2**48, at most {MAX_NDIM} dims and "
                    f"{MAX_VALUE_BYTES} bytes")
        _SANE.add(n)


def _sane(m: TensorMeta) -> bool:
    shape, stride, offset = m.shape, m.stride, m.offset
    if not (isinstance(shape, tuple) and isinstance(stride, tuple) and len(shape) == len(stride) <= MAX_NDIM
            and type(offset) is int and 0 <= offset < MAX_SIZE):
        return False
    if not all(type(d) is int and 0 <= d < MAX_SIZE for d in (*shape, *stride)):
        return False
    return max(meta_extent(m), m.nbytes) <= MAX_VALUE_BYTES


def meta_extent(m: TensorMeta) -> int:
    """Bytes of storage a value with meta ``m`` reaches (0 when empty)."""
    if m.numel == 0:
        return 0
    last = m.offset + sum((s - 1) * st for s, st in zip(m.shape, m.stride, strict=False) if s > 0)
    return max(m.numel, last + 1) * m.dtype.itemsize


@cache
def _schema(op: str) -> torch.FunctionSchema | None:
    try:
        fn = resolve_op(op)
    except UnsupportedOpError:
        return None  # a genie fused op (no schema: its outputs are fresh) or one refused at decode
    return getattr(fn, "_schema", None)


@cache
def _aliasing(op: str) -> tuple[tuple[int | None, ...], tuple[int, ...]]:
    """(for each return: the argument index it aliases, or None when fresh; arguments written)."""
    schema = _schema(op)
    if schema is None:
        return (), ()
    args = schema.arguments
    rets: list[int | None] = []
    for r in schema.returns:
        ai = r.alias_info
        src = None
        if ai is not None:
            for i, a in enumerate(args):  # a set name like 'a', or a list's wildcard '*'
                b = a.alias_info
                if b is not None and (ai.before_set & b.before_set
                                      or (not ai.before_set and "*" in b.after_set)):
                    src = i
                    break
        rets.append(src)
    writes = tuple(i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write)
    return tuple(rets), writes


def _arg(node: Node, schema: torch.FunctionSchema, i: int) -> object:
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(schema.arguments[i].name)


def predict(graph: Graph, constant_bytes: Mapping[str, int], *, inputs_held: bool = False) -> Prediction:
    """The most bytes ``graph`` allocates alive at once, replaying its frees on metadata.
    ``inputs_held``: the inputs are used where they were received (a CPU server), so they are
    counted as received frames, not as this run's."""
    group: dict[tuple[int, int], int] = {}  # (node, output) -> storage group
    size: dict[int, int] = {}  # group -> bytes it allocated (0: not this run's)
    holders: dict[int, int] = {}  # group -> live node values on it
    const_of: dict[int, str] = {}  # group -> the constant it is
    dead_after = graph.dead_after()
    kept = {r.node for r in graph.outputs}
    on: dict[int, set[int]] = {}  # node -> groups its value holds
    alive = peak = copies = 0
    copied: set[str] = set()

    def new_group(nbytes: int) -> int:
        nonlocal alive, peak
        g = len(size)
        size[g], holders[g] = nbytes, 0
        alive += nbytes
        peak = max(peak, alive)
        return g

    for n in graph.nodes:
        rets, writes = _aliasing(n.op) if n.op not in (INPUT, CONST, RESIDENT) else ((), ())
        schema = _schema(n.op) if rets or writes else None
        for i in writes:  # copy on write: a constant written to is cloned for this run
            ref = _arg(n, schema, i) if schema is not None else None
            g = group.get((ref.node, ref.index)) if type(ref) is Ref else None
            if g is not None and g in const_of and const_of[g] not in copied:
                copied.add(const_of[g])
                copies += constant_bytes.get(const_of[g], 0)
                new_group(constant_bytes.get(const_of[g], 0))
        groups: set[int] = set()
        for k, m in enumerate(n.outputs):
            src = rets[k] if k < len(rets) else (rets[-1] if rets and n.multi else None)
            ref = _arg(n, schema, src) if src is not None and schema is not None else None
            if type(ref) is Ref and (ref.node, ref.index) in group:
                g = group[(ref.node, ref.index)]
            else:
                fresh = n.op not in (CONST, RESIDENT) and not (inputs_held and n.op == INPUT)
                g = new_group(max(meta_extent(m), m.nbytes) if fresh else 0)
                if n.op == CONST:
                    const_of[g] = n.args[0]
            group[(n.id, k)] = g
            groups.add(g)
        on[n.id] = groups
        for g in groups:
            holders[g] += 1
        for dead in dead_after.get(n.id, ()):
            if dead in kept:
                continue
            for g in on.pop(dead, ()):
                holders[g] -= 1
                if holders[g] == 0:
                    alive -= size[g]
    return Prediction(peak, copies)


# -- sizes taken from arguments --------------------------------------------------------------------
# nodes already checked (template fills share them), with the nodes they read then: a fill may
# reuse a node whose inputs were rebuilt with other sizes, and a size can follow from an input's
_CHECKED: weakref.WeakKeyDictionary[Node, tuple[Node, ...]] = weakref.WeakKeyDictionary()


@cache
def _sized_by_args(op: str) -> bool:
    """Whether ``op`` allocates a size its non-tensor arguments choose: no tensor arguments (a
    factory), or an int-list argument, and an output that is not a view."""
    schema = _schema(op)
    if schema is None:
        return False
    rets, _ = _aliasing(op)
    if rets and all(r is not None for r in rets):
        return False  # views and in-place ops allocate nothing
    types = [str(a.type) for a in schema.arguments]
    has_tensor = any("Tensor" in t for t in types)
    return not has_tensor or any(t in ("List[int]", "List[SymInt]") for t in types)


def check_sizes(graph: Graph) -> None:
    """RemoteExecutionError unless each op that takes its size from its arguments makes, on the meta
    device, what its node declares (shape, dtype and storage bytes)."""
    for n in graph.nodes:
        if not _sized_by_args(n.op):
            continue
        producers = tuple(graph.nodes[r.node] for r in n.refs())
        seen = _CHECKED.get(n)
        if seen is not None and len(seen) == len(producers) and all(
                a is b for a, b in zip(seen, producers, strict=True)):
            continue

        def fake(r: Ref) -> torch.Tensor:
            m = graph.meta(r)
            return torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device="meta")

        args = map_refs(n.args, fake)
        kwargs = {k: map_refs(v, fake) for k, v in n.kwargs.items()}
        if "device" in kwargs or not any(isinstance(a, torch.Tensor) for a in _flat(args, kwargs)):
            kwargs["device"] = torch.device("meta")
        kwargs.pop("pin_memory", None)
        try:
            out = resolve_op(n.op)(*args, **kwargs)
        except Exception as e:
            raise RemoteExecutionError("cannot size this op's output before running it: "
                                       f"{type(e).__name__}: {e}", op=n.op) from e
        _compare(n, out, storage=True)
        _CHECKED[n] = producers


def _flat(args: tuple, kwargs: dict) -> list:
    out: list = []
    for v in (*args, *kwargs.values()):
        out.extend(v if isinstance(v, (list, tuple)) else (v,))
    return out


def check_output(node: Node, value: object) -> object:
    """``value``, held to what ``node`` declares: RemoteExecutionError if it is bigger.

    A value of the declared shape and dtype takes the declared strides: the client worked out every
    later view and memory format from them, and a kernel may lay its output out otherwise than
    the meta kernel said (a CPU convolution of a channels-last input answers channels-last; an
    elementwise kernel keeps its input's strides in dimensions of size 1, where the meta kernel
    writes its own, and torch's memory-format guess reads those: ``native_group_norm`` refused a
    value the client took for channels-last). What is returned in its place is a new tensor object
    (a view of the same memory where the strides differ only in size-1 dimensions, which address
    nothing; else, for a fresh output, a copy in the declared layout): the op's own tensor is never
    changed in place, for it may be another value's view (a constant's, every client's) or that
    value itself. A view keeps the layout its base gives it: a base the server laid out
    itself (a kept ``expand``, an uploaded constant: ``_SOURCES``) is read by index alike.
    Otherwise an output may be smaller than declared, never larger: torch's meta kernels, from which
    clients declare, sometimes say more than the real kernel makes (``native_batch_norm`` in eval
    mode saves empty statistics). Outputs a kernel sizes its own way (``PRIVATE_OUTPUTS``) are held
    to the node's largest declared output; an undefined output (``None``) allocates nothing."""
    declared = node.outputs
    if not declared:
        return value
    if type(value) is torch.Tensor:
        m = declared[0]
        if value.dtype == m.dtype and value.shape == m.shape and (value.stride() == m.stride
                                                                  or node.op in _SOURCES):
            return value  # the common case, in a few reads
        got: list = [value]
    elif isinstance(value, (tuple, list)):
        got = list(value)
    else:
        return value  # a scalar result (``_local_scalar_dense``): nothing allocated
    replaced = False
    private = PRIVATE_OUTPUTS.get(node.op, ())
    cap = max(max(meta_extent(m), m.nbytes) for m in declared)
    for i, t in enumerate(got):
        if t is None or not isinstance(t, torch.Tensor):
            continue
        if i >= len(declared):
            _refuse(node, got, "more tensors than")
        m = declared[i]
        made = t.numel() * t.element_size()
        if i in private:
            if made > cap:
                _refuse(node, got, "more bytes than")
        elif t.dtype == m.dtype and t.shape == m.shape:
            if t.stride() != m.stride and node.op not in _SOURCES:
                new = _conform(node, t, i, m)
                if new is not t:
                    got[i], replaced = new, True
        elif made > max(meta_extent(m), m.nbytes):
            _refuse(node, got, "more bytes than")
    if not replaced:
        return value
    return got[0] if type(value) is torch.Tensor else type(value)(got)


# Values the server binds as it holds them (an upload, a shared constant, a kept value): laid out by
# the server (a kept ``expand`` is a plain copy), and never changed in place here (a constant is
# every client's).
_SOURCES = frozenset({INPUT, CONST, RESIDENT})

# Outputs that only a kernel's own backward reads, and that the meta and real kernels size their
# own way (``_embedding_bag``'s offset2bag, bag_size and max_indices: ``int64[0], [4], [4]`` made
# where the meta kernel declares ``int64[8], [4], [0]``). Bounded, not compared.
PRIVATE_OUTPUTS: dict[str, frozenset[int]] = {
    "aten._embedding_bag.default": frozenset({1, 2, 3}),
    "aten._embedding_bag_forward_only.default": frozenset({1, 2, 3}),
}


_UNSAID_VIEWS = graph.UNDECLARED_ALIASES  # ``_unsafe_view``: a view its schema does not say


def _conform(node: Node, t: torch.Tensor, i: int, m: TensorMeta) -> torch.Tensor:
    """Output ``i`` (``t``) laid out as ``m`` says: a new tensor object, or ``t`` when it must stay."""
    rets, writes = _aliasing(node.op)
    if writes and any(r is not None for r in rets):
        return t  # an in-place or out= op's argument: another node's value, not this one's to change
    if _same_layout(t, m):
        return t.as_strided(m.shape, m.stride, t.storage_offset())  # the same addresses
    if (rets[i] if i < len(rets) else rets[-1] if rets and node.multi else None) is not None \
            or node.op in _UNSAID_VIEWS:
        return t  # a view (``split``'s, ``_unsafe_view``'s too): copying it would cut it from its base
    flat = torch.empty(meta_extent(m) // t.element_size(), dtype=t.dtype, device=t.device)
    try:
        return flat.as_strided(m.shape, m.stride, m.offset).copy_(t)
    except RuntimeError:  # a declared layout that overlaps itself (a stride of 0) holds no copy
        return t


def _same_layout(t: torch.Tensor, m: TensorMeta) -> bool:
    """Equal strides wherever they matter: a dimension of size 1, or an empty tensor, has any."""
    return t.numel() == 0 or all(n == 1 or a == b for n, a, b in zip(m.shape, t.stride(), m.stride,
                                                                     strict=True))


def _refuse(node: Node, got: list, what: str) -> None:
    made = ", ".join("None" if t is None else f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
                     for t in got if t is None or isinstance(t, torch.Tensor))
    said = ", ".join(str(m) for m in node.outputs)
    raise RemoteExecutionError(f"node {node.id} made {made or 'no tensor'}: {what} the client's graph "
                               f"declares, {said}; the graph's metadata is wrong (a client bug, or a lie), "
                               "so the run stops here", op=node.op)


def _compare(node: Node, value: object, *, storage: bool) -> None:
    if isinstance(value, torch.Tensor):
        got = [value]
    elif isinstance(value, (tuple, list)):
        got = [v for v in value if isinstance(v, torch.Tensor)]
    else:
        return  # a scalar result (``_local_scalar_dense``): nothing allocated
    declared = node.outputs
    bad = len(got) > len(declared)
    for t, m in zip(got, declared, strict=False):
        made = t.untyped_storage().nbytes() if storage else t.numel() * t.element_size()
        bad = bad or made > max(meta_extent(m), m.nbytes)
    if bad:
        made = ", ".join(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in got)
        said = ", ".join(str(m) for m in declared)
        raise RemoteExecutionError(f"node {node.id} made {made or 'no tensor'} but the client's graph "
                                   f"declares {said}: the graph's metadata is wrong (a client bug, or "
                                   "a lie), so the run stops here", op=node.op)
