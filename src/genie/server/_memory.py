"""A run's memory, predicted from its graph before it runs, and the checks that keep the prediction
honest while it runs (the graph's metadata comes from the client, who may lie).

Call tree::

    predict(graph, constant_bytes) -> Prediction      replay the interpreter on metadata alone:
      a computed node allocates its outputs, unless its op's schema says an output aliases an
      argument (a view, or an in-place op's return); a storage is freed once every value on it
      has had its last reader (as Interpreter.step frees); an input is a fresh copy; a constant
      the run writes to is copied first (see _job)
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

from genie._errors import RemoteExecutionError, UnsupportedOpError
from genie.graph import CONST, INPUT, RESIDENT, Graph, Node, Ref, TensorMeta, map_refs, resolve_op


@dataclass(frozen=True, slots=True)
class Prediction:
    peak: int  # bytes the run allocates that are alive at once, at most
    copies: int  # of that, constants the run writes to (each copied once, alive all run)


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


def predict(graph: Graph, constant_bytes: Mapping[str, int]) -> Prediction:
    """The most bytes ``graph`` allocates alive at once, replaying its frees on metadata."""
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
                fresh = n.op not in (CONST, RESIDENT)
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
_CHECKED: weakref.WeakSet[Node] = weakref.WeakSet()  # nodes already checked (template fills share them)


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
        if n in _CHECKED or not _sized_by_args(n.op):
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
        _CHECKED.add(n)


def _flat(args: tuple, kwargs: dict) -> list:
    out: list = []
    for v in (*args, *kwargs.values()):
        out.extend(v if isinstance(v, (list, tuple)) else (v,))
    return out


def check_output(node: Node, value: object) -> None:
    """RemoteExecutionError if ``value`` holds more than ``node`` declares: more tensors, or one with
    more bytes. Smaller is fine: torch's meta kernels, from which clients declare, sometimes say
    more than the real kernel makes (``native_batch_norm`` in eval mode saves empty statistics)."""
    declared = node.outputs
    if not declared:
        return
    if len(declared) == 1 and type(value) is torch.Tensor:  # the common case, in a few reads
        m = declared[0]
        if value.dtype == m.dtype and value.shape == m.shape:
            return  # the declared shape and dtype: exactly the bytes declared
    _compare(node, value, storage=False)


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
