"""LazyTensor: a wrapper subclass whose ``__torch_dispatch__`` records one node per aten op.

Hot path (one op): convert args (LazyTensor -> Ref, CPU tensor -> constant or input), look the
output metadata up in the shape cache (meta tensors on a miss), append a Node, wrap the outputs.
Ops that return no tensor (``item``, ``equal``), copies to the CPU, and ops whose output shape
depends on data run at once: they flush what is pending and carry on.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map

from genie._errors import GenieError, UnsupportedOpError
from genie._profile import mirror_watching, recording
from genie.graph import CONST, INPUT, RESIDENT, Node, Ref, TensorMeta, content_digest
from genie.lazy._meta import SHAPES, UNDEFINED, OpInfo, infer, meta_tensor, op_info
from genie.lazy._recorder import FAILED, Recorder
from genie.lazy._rng import RNG

aten = torch.ops.aten
_DEFAULT_DEVICE = None  # set by _device.register(): torch.device needs the backend renamed first
_SOURCE_OPS = (CONST, INPUT, RESIDENT)
_make_wrapper = torch.Tensor._make_wrapper_subclass
_default_dtype = torch.get_default_dtype
_STRIDED = torch.strided
_DATA = torch._C.TensorBase.data  # the C-level ``.data`` property, which LazyTensor extends
_WATCHED = False  # genie.profile() or GENIE_SYNC_DEBUG is on: time each op as recording
AUTOGRAD_THREAD_SEEN = False  # a thread that started no program recorded (see _backward's drain)
mirror_watching(globals(), "_WATCHED")


class _ThreadState(threading.local):
    """Per-thread recording state. Every attribute exists from the start: a missing attribute on a
    thread-local raises and catches an AttributeError, which cost ~0.5 µs per op here."""

    def __init__(self) -> None:
        self.captures: list[Recorder] = []
        self.modules: list[str] = []
        self.device: Recorder | None = None  # the program this thread started
        self.joined: Recorder | None = None  # one it extends, having started none (autograd's threads)


_tls = _ThreadState()


# -- which recorder records -------------------------------------------------------------------
# A program is a recorder; its program order is the order ops take its lock. An op joins the
# program of the first remote tensor it reads, whatever thread runs it: autograd's engine runs a
# remote backward on a device thread of its own ("Dummy-1"), and its ops, its hooks' and the grads
# it accumulates must land in the program that made the forward, or the program order the server
# replays is lost (a gradient read before the write that zeroed it). Only an op that reads no
# remote tensor (a factory, an upload) starts from the thread: the capture it is in, else the
# program it started, else the last one it joined.
def capture_stack() -> list[Recorder]:
    return _tls.captures


def current_recorder() -> Recorder:
    tls = _tls
    if tls.captures:
        return tls.captures[-1]
    rec = tls.device or tls.joined
    if rec is None:
        rec = tls.device = Recorder("device")
    return rec


def recorder_for(args: tuple) -> Recorder:
    """The recorder an op with positional ``args`` records into (see above). Per op: kept short."""
    tls = _tls
    if not tls.captures:
        for a in args:
            t = type(a)
            if t is not LazyTensor:
                if (t is not list and t is not tuple) or not a or type(a[0]) is not LazyTensor:
                    continue
                a = a[0]  # cat, stack, foreach: a list of tensors
            rec = a._rec
            if rec.mode == "device":  # else a captured value read after its capture: imported
                if tls.device is None:
                    _joined(tls, rec)
                return rec
            break
    return current_recorder()


def _joined(tls: _ThreadState, rec: Recorder) -> None:
    global AUTOGRAD_THREAD_SEEN
    tls.joined, AUTOGRAD_THREAD_SEEN = rec, True


def module_path() -> str:
    stack = _tls.modules
    return stack[-1] if stack else ""


def module_stack() -> list[str]:
    return _tls.modules


# -- the tensor --------------------------------------------------------------------------------
class LazyTensor(torch.Tensor):
    """A tensor on ``remote_accelerator``: its value is a node of a recorded program."""

    _node: Node
    _index: int
    _rec: Recorder
    _meta: TensorMeta
    _device: torch.device

    @staticmethod
    def __new__(cls, rec: Recorder, node: Node, index: int, meta: TensorMeta, device: torch.device):
        # positional (size, strides, storage_offset, memory_format, dtype, layout, device): parsing
        # keywords costs a third of the call
        t = _make_wrapper(cls, meta.shape, meta.stride, meta.offset, None, meta.dtype, _STRIDED, device)
        t._rec, t._node, t._index, t._meta, t._device = rec, node, index, meta, device
        rec.track(t)
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        try:
            if _WATCHED:
                return recording(dispatch, func, args, kwargs or {})
            entry = _ENTRIES.get(id(func))  # dispatch() inlined for its common case: one frame less
            if entry is None or entry.special is not None or not entry.plain:
                return dispatch(func, args, kwargs or {})
            rec = recorder_for(args)
            with rec.lock:
                return _record(rec, func, entry.info, args, kwargs or {})
        except BaseException as e:  # free on the way in (3.11); only a failure pays for the check
            if not in_cpp_backward():  # (a Ctrl-C too: torch would abort on it there)
                raise
            return failed_in_backward(func, args, kwargs or {}, e)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        text = repr(materialize([self])[0])
        return f"{text[:-1]}, device='{self.device}')" if text.endswith(")") else text

    def tolist(self) -> Any:
        return self.cpu().tolist()

    data = property(_DATA.__get__, lambda self, new: set_data(self, new), doc="see _metadata.set_data")

    def __bool__(self) -> bool:  # a frame of its own: genie.profile() tells bool(t) from t.item()
        return torch.Tensor.__bool__(self)

    def numpy(self, *, force: bool = False) -> Any:
        raise TypeError(f"can't convert {self.device} device type tensor to numpy. "
                        "Use Tensor.cpu() to copy the tensor to host memory first.")

    def __deepcopy__(self, memo: dict) -> LazyTensor:
        """A recorded clone (torch's deepcopy would copy the recorder, locks and all)."""
        hit = memo.get(id(self))
        if hit is None:
            with torch.no_grad():
                hit = self.clone()
            if isinstance(self, torch.nn.Parameter):  # a remote module's weight stays a Parameter
                hit = torch.nn.Parameter(hit, self.requires_grad)
            memo[id(self)] = hit
        return hit

    def __reduce_ex__(self, protocol: int) -> Any:  # pickle, torch.save: see _checkpoint
        return reduce_to_host(self, protocol)


def wrap(rec: Recorder, node: Node, index: int, meta: TensorMeta, device: torch.device) -> LazyTensor:
    return LazyTensor(rec, node, index, meta, device)


# -- materialization ---------------------------------------------------------------------------
def materialize(tensors: list[LazyTensor]) -> list[torch.Tensor]:
    """CPU values of ``tensors``; one run per recorder involved."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_rec: dict[int, list[int]] = {}
    for i, t in enumerate(tensors):
        by_rec.setdefault(id(t._rec), []).append(i)
    for idx in by_rec.values():
        rec = tensors[idx[0]]._rec
        fetched, _ = rec.flush([tensors[i] for i in idx])
        for i, v in zip(idx, fetched, strict=True):
            out[i] = v
    return out  # type: ignore[return-value]


def _to_host(v: Any) -> Any:
    lazies = []
    tree_map(lambda x: lazies.append(x) if isinstance(x, LazyTensor) else None, v)
    if not lazies:
        return v
    values = dict(zip(map(id, lazies), materialize(lazies), strict=True))
    return tree_map(lambda x: values[id(x)] if isinstance(x, LazyTensor) else x, v)


# -- recording ---------------------------------------------------------------------------------
def _device_error(a: torch.device, b: torch.device) -> RuntimeError:
    return RuntimeError("Expected all tensors to be on the same device, but found at least two "
                        f"devices, {a} and {b}!")


_NUMBERS = frozenset({int, float, bool, complex})
_MARKED = frozenset({FAILED, *_SOURCE_OPS})  # nodes a reader must look at before it records


class _Args:
    """Converts one op's arguments for the recorder and builds its shape-cache key.

    The key holds each tensor's TensorMeta and every other value that can change the output meta
    (``OpInfo.typed`` says where a Python number only promotes, so only its type goes in); other
    non-int values go in with their type, since ``1``, ``1.0`` and ``True`` hash alike.
    """

    __slots__ = ("rec", "key", "storages", "device")

    def __init__(self, rec: Recorder, info: OpInfo) -> None:
        self.rec = rec
        # a str hashes once, an OpOverload's hash is Python code; the default dtype decides what
        # ``int_tensor + 1.5`` or ``int_tensor / 2`` gives
        self.key: list = [info.name, _default_dtype()]
        self.storages: dict[Ref, int] | None = {} if info.aliases else None
        self.device: torch.device | None = None

    def positional(self, args: tuple, typed: tuple[bool, ...]) -> tuple:
        """``convert`` over ``args``, with the common cases inlined: this loop runs per op."""
        out = []
        key = self.key
        rec = self.rec
        for i, v in enumerate(args):
            t = type(v)
            if t is LazyTensor and v._rec is rec:
                dev = v._device
                if dev is not self.device:
                    if self.device is None:
                        self.device = dev
                    elif dev != self.device:
                        raise _device_error(self.device, dev)
                node = v._node
                if node.op in _MARKED:
                    _mark_read(rec, node)
                key.append(v._meta)
                ref = Ref(node.id, v._index)
                if self.storages is not None:
                    self.storages[ref] = node.storages[v._index]
                out.append(ref)
            elif t is int and not typed[i]:
                key.append(v)
                out.append(v)
            else:
                out.append(self.convert(v, typed[i]))
        return tuple(out)

    def convert(self, v: Any, typed: bool = False) -> Any:
        t = type(v)
        if t is LazyTensor or isinstance(v, torch.Tensor):
            return self.tensor(v)
        if typed and t in _NUMBERS:
            self.key.append(t)
        elif t is int:
            self.key.append(v)
        elif t is list or t is tuple:
            for x in v:
                if type(x) is not int:
                    self.key.append(len(v))
                    return t([self.convert(x) for x in v])
            self.key.append(tuple(v))  # sizes, dims: the common list, keyed in one go
            return t(v)
        else:
            self.key.append((t, v))
        return v

    def tensor(self, t: torch.Tensor) -> Ref:
        rec = self.rec
        if isinstance(t, LazyTensor):
            dev = t._device
            if self.device is None:
                self.device = dev
            elif dev is not self.device and dev != self.device:
                raise _device_error(self.device, dev)
            node = t._node if t._rec is rec else import_into(rec, t)
            if node.op in _MARKED:
                _mark_read(rec, node)
            self.key.append(t._meta)
            ref = Ref(node.id, t._index)
            if self.storages is not None:
                self.storages[ref] = node.storages[t._index]
            return ref
        node = host_tensor_node(rec, t, self.key[0] in _HOST_INDICES)  # key[0]: the op's name
        self.key.append(node.outputs[0])
        ref = Ref(node.id, 0)
        if self.storages is not None:
            self.storages[ref] = node.storages[0]
        return ref


def _mark_read(rec: Recorder, node: Node) -> None:
    """A source read by a new node is registered with the recorder; a failed value says why."""
    if node.op == FAILED:
        raise GenieError(node.args[0])
    rec._sources[node.id] = node


_DIGESTS: dict[int, tuple[Any, int, str]] = {}  # id(tensor) -> (weakref, version, digest)


def _digest_cached(t: torch.Tensor) -> str:
    hit = _DIGESTS.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    key = id(t)
    d = content_digest(t)
    _DIGESTS[key] = (weakref.ref(t, lambda _: _DIGESTS.pop(key, None)), t._version, d)
    return d


# Ops that take host index tensors with a device input, as CUDA's advanced indexing does
_HOST_INDICES = frozenset({"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default",
                           "aten._index_put_impl_.default", "aten._unsafe_index.Tensor",
                           "aten._unsafe_index_put.default"})


def host_tensor_node(rec: Recorder, t: torch.Tensor, host_indices: bool = False) -> Node:
    """A CPU tensor met by an op: a weight or captured constant, an input, or a device error."""
    if rec.mode == "device":
        if t.dim() != 0 and not (host_indices and t.device.type == "cpu"):
            raise _device_error(torch.device("remote_accelerator:0"), t.device)
        return rec.const_node(t)
    if t.device.type != "cpu":
        raise _device_error(torch.device("remote_accelerator:0"), t.device)
    if rec.mode == "trace" or t.dim() == 0 or isinstance(t, torch.nn.Parameter) or id(t) in rec.weight_ids:
        return rec.weight_node(t, _digest_cached)  # one node per tensor, not per content
    return rec.input_node(t)


def import_into(rec: Recorder, t: LazyTensor) -> Node:
    """A tensor of another program (a capture, or a device program ``rec`` did not join) read by
    ``rec``. That program first runs what it has pending (the value, and any write to it), so
    ``rec`` reads the value as that program's order left it."""
    other = t._rec
    if t._node.op not in _SOURCE_OPS or (other.mode == "device" and other.pending):
        other.flush()
    src = t._node
    key = (id(src), t._index)  # src is held below, so its id names it while the entry lives
    hit = rec.imports.get(key)
    if hit is not None and hit[0] is src:
        return hit[1]
    if src.op == CONST:
        digest = src.args[0]
        node = rec.const_node(other.constants[digest], digest)
    elif src.op == INPUT:
        node = rec.const_node(other.input_tensors[src.args[0]])
    else:
        nid = rec.new_id()
        node = rec.add(Node(nid, RESIDENT, src.args, outputs=(t._meta,), storages=(nid,)))
    rec.imports[key] = (src, node)  # holding src keeps its remote value alive until rec's next run
    return node


class _Entry:
    """What ``dispatch`` needs of one OpOverload, worked out on its first call."""

    __slots__ = ("func", "special", "info", "refused", "plain")

    def __init__(self, func: torch._ops.OpOverload) -> None:
        self.func = func  # held, so that the id keying _ENTRIES is never reused
        self.special = SPECIAL.get(func)
        self.info = op_info(func)
        self.refused = func.namespace not in ("aten", "prims")
        # recorded as it comes
        self.plain = (self.info.returns_tensors or self.info.void_writes) and not self.refused


_ENTRIES: dict[int, _Entry] = {}  # by id(func): hashing an OpOverload runs Python code


def dispatch(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Any:
    entry = _ENTRIES.get(id(func))
    if entry is None:
        entry = _ENTRIES[id(func)] = _Entry(func)
    if entry.special is not None:
        return entry.special(func, args, kwargs)
    info = entry.info
    if not info.returns_tensors and not info.void_writes:
        return func(*_to_host(args), **_to_host(kwargs))
    if entry.refused:
        raise UnsupportedOpError(f"{func.namespace}::{func._opname}", "only aten and prims ops are recorded")
    rec = recorder_for(args)
    with rec.lock:
        return _record(rec, func, info, args, kwargs)


def _record(rec: Recorder, func, info: OpInfo, args: tuple, kwargs: dict) -> Any:
    conv = _Args(rec, info)
    cargs = conv.positional(args, info.typed)
    ckwargs = {}
    if kwargs:
        typed_kw = info.typed_kw
        for k, v in kwargs.items():
            conv.key.append(k)
            ckwargs[k] = conv.convert(v, k in typed_kw)
    device = conv.device or _DEFAULT_DEVICE
    key = tuple(conv.key)
    metas = SHAPES.lookup(key)
    dynamic = False
    if metas is None:
        if info.dynamic_shape:
            dynamic = True
        else:
            try:
                metas = infer(func, *_meta_args(args, kwargs))
            except (NotImplementedError, torch._subclasses.fake_tensor.DataDependentOutputException,
                    torch._subclasses.fake_tensor.DynamicOutputShapeException):
                dynamic = True
            else:
                SHAPES.store(key, metas)
    restrided = None
    if info.inplace_self and not dynamic:
        target = _arg_value(func, info.alias_of[0], args, kwargs)
        if isinstance(target, LazyTensor) and target._meta != metas[0]:
            if info.alias_of[0] != 0 or info.write_kwargs:
                check_not_resized(info, target, metas[0])  # out=: the caller's tensor would go stale
            else:  # squeeze_, transpose_, resize_: the tensor itself changes shape, as on CUDA
                cargs = (fresh_alias(rec, cargs[0], target._meta, conv.storages), *cargs[1:])
                restrided = target
    nid = rec.new_id()
    n_out = info.n_returns if dynamic else len(metas)
    if info.aliases:
        storages, writes = _alias_storages(rec, func, info, cargs, ckwargs, conv.storages, n_out)
    elif n_out == 1:
        storages, writes = (nid,), ()  # a fresh storage: named by its node, as constants are
    else:
        storages, writes = tuple([rec.new_id() for _ in range(n_out)]), ()
    node = rec.add(Node(nid, info.name, cargs, ckwargs, () if dynamic else metas, info.multi,
                        storages, writes, module_path(), RNG.next_seed() if info.seeded else None))
    if not info.n_returns:  # it only wrote its arguments
        return None
    if dynamic:
        if info.returns_list:
            raise UnsupportedOpError(info.name, "data-dependent number of outputs")
        _, kept = rec.flush(extra=[Ref(nid, i) for i in range(n_out)])
        outs = [wrap(rec, res, 0, meta, device) for res, meta in kept]
        node.outputs = tuple(m for _, m in kept)
    else:
        if restrided is not None:
            rebind(restrided, rec, node, metas[0])
            return restrided
        if info.inplace_self:
            target = _arg_value(func, info.alias_of[0], args, kwargs)
            if isinstance(target, LazyTensor) and target._meta == metas[0]:
                return target
            # same shape, other strides (an out= op restrided its output): a new wrapper
        if not info.multi:
            return LazyTensor(rec, node, 0, metas[0], device)
        outs = [None if m is UNDEFINED else LazyTensor(rec, node, i, m, device) for i, m in enumerate(metas)]
    if not info.multi:
        return outs[0]
    return outs if info.returns_list else tuple(outs)


def _alias_storages(rec: Recorder, func, info: OpInfo, cargs: tuple, ckwargs: dict,
                    known: dict[Ref, int], n_out: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Views share their base's storage; in-place and out= ops name the storages they write."""
    if info.view_of_self and n_out == 1 and cargs and type(cargs[0]) is Ref:
        return (known[cargs[0]],), ()  # the common case (view, transpose, slice...), no search

    def storage(pos: int | str | None) -> int | None:
        v = None if pos is None else _arg_value(func, pos, cargs, ckwargs)
        return known.get(v) if type(v) is Ref else None

    last = len(info.alias_of) - 1
    storages = tuple(_or_new(rec, storage(info.alias_of[min(i, last)])) for i in range(n_out))
    writes = []
    for p in (*info.writes, *info.write_kwargs):  # a list argument (``_foreach_mul_``) writes each
        v = _arg_value(func, p, cargs, ckwargs)
        writes.extend(s for s in (known.get(r) for r in (v if type(v) in (list, tuple) else (v,))
                                  if type(r) is Ref) if s is not None)
    return storages, tuple(dict.fromkeys(writes))


def _arg_value(func, pos: int | str, args: tuple, kwargs: dict) -> Any:
    if isinstance(pos, str):
        return kwargs.get(pos)
    if pos < len(args):
        return args[pos]
    return kwargs.get(func._schema.arguments[pos].name)


def _or_new(rec: Recorder, storage: int | None) -> int:
    return rec.new_id() if storage is None else storage


def _meta_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def to_meta(x: Any) -> Any:
        if isinstance(x, LazyTensor):
            return meta_tensor(x._meta)
        if isinstance(x, torch.Tensor):
            return x.detach().to("meta")
        if isinstance(x, torch.device):
            return torch.device("meta")
        return x

    return tree_map(to_meta, args), tree_map(to_meta, kwargs)


# -- ops handled before recording ----------------------------------------------------------------
def _to_copy(func, args, kwargs):
    device = kwargs.get("device")
    to_host = device is not None and torch.device(device).type == "cpu"
    if not isinstance(args[0], LazyTensor) or (to_host and _tls.captures):
        # Inside a capture the host is part of the program (``x.to(input)`` in rms_norm): the
        # copy is recorded, with the device left to the executor.
        kwargs = {k: v for k, v in kwargs.items() if k != "device"}
    elif to_host:
        rest = {k: v for k, v in kwargs.items() if k != "device"}
        (value,) = materialize([args[0]])
        return func(value, **rest) if rest else value
    return _default(func, args, kwargs)


def copy_into(func, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(dst, LazyTensor) and not isinstance(src, LazyTensor):  # inside a capture
        return _default(func, args, kwargs)
    if not isinstance(dst, LazyTensor):  # remote -> host
        (value,) = materialize([src])
        return dst.copy_(value)
    if not isinstance(src, LazyTensor) and _is_fresh_empty(dst, src):
        rec = dst._rec
        with rec.lock:
            if rec.pending and rec.pending[-1] is dst._node:
                rec.pending.pop()
            if rec.history and rec.history[-1] is dst._node:
                rec.history.pop()
            dst._node, dst._index = rec.const_node(src.detach().clone()), 0
            rec.track(dst)
        return dst
    if not isinstance(src, LazyTensor):
        rec = recorder_for((dst,))
        with rec.lock:
            node = rec.const_node(src.detach().clone())
            src = wrap(rec, node, 0, node.outputs[0], dst.device)
    return _default(func, (dst, src, *args[2:]), kwargs)


def _is_fresh_empty(dst: LazyTensor, src: torch.Tensor) -> bool:
    """``.to(remote)`` is an empty then a copy_: the data can simply become a constant."""
    n = dst._node
    return (n.op in ("aten.empty.memory_format", "aten.empty_strided.default")
            and bool(dst._rec.pending) and dst._rec.pending[-1] is n
            and src.dtype == dst.dtype and tuple(src.shape) == tuple(dst.shape)
            and src.is_contiguous() and dst.is_contiguous() and src.device.type == "cpu"
            and not dst.device.index)  # a constant names no device: another server's stays a copy


def _alias(func, args, kwargs):
    t = args[0]
    if not isinstance(t, LazyTensor):
        return _default(func, args, kwargs)
    return wrap(t._rec, t._node, t._index, t._meta, t.device)


def _default(func, args, kwargs):
    info = op_info(func)  # cached by functools
    rec = recorder_for(args)
    with rec.lock:
        return _record(rec, func, info, args, kwargs)


SPECIAL: dict[Any, Callable] = {
    aten._has_compatible_shallow_copy_type.default: lambda func, args, kwargs: shallow_copy_compatible(*args),
    aten._to_copy.default: _to_copy,
    aten.copy_.default: copy_into,
    aten.detach.default: _alias,
    aten.alias.default: _alias,
}

# Kept in modules of their own, which need the names above: an op that fails inside autograd's
# backward, checkpoints (``set_`` onto a checkpoint's storage; ``torch.load``'s deserializer), and
# ops that change a tensor's own metadata (``transpose_``, ``t.data = other``).
from genie.lazy._backward import failed_in_backward, in_cpp_backward  # noqa: E402
from genie.lazy._checkpoint import install as _install_checkpoints  # noqa: E402
from genie.lazy._checkpoint import reduce_to_host  # noqa: E402
from genie.lazy._metadata import (  # noqa: E402
    check_not_resized,
    fresh_alias,
    rebind,
    set_data,
    shallow_copy_compatible,
)

_install_checkpoints(SPECIAL)
