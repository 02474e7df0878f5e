"""Ops that change a remote tensor's own metadata, as on CUDA.

A LazyTensor is a wrapper: its sizes and strides live in its TensorImpl, its value is a node of a
recorded program. An in-place op that changes its argument's metadata (``squeeze_``,
``transpose_``, ``resize_``, ``as_strided_``) runs on the server on a fresh alias of the value, so
the other tensors of the old value (a ``detach()``, a view: other TensorImpls on CUDA too) keep
their shape; the tensor it was called on then takes the result, TensorImpl metadata included, in
place (``set_data`` copies a new wrapper's metadata into it). ``t.data = other`` does the same.
An ``out=`` tensor is another matter: the kernel would resize it through a reference the wrapper
never sees, so a resize there is refused rather than left stale.
"""

from __future__ import annotations

import torch

from genie._errors import UnsupportedOpError
from genie.graph import Node, Ref, TensorMeta
from genie.lazy._lazy import LazyTensor, module_path
from genie.lazy._meta import OpInfo
from genie.lazy._recorder import Recorder

_DATA = torch._C.TensorBase.data  # the C-level ``.data`` property


def check_not_resized(info: OpInfo, target: LazyTensor, meta: TensorMeta) -> None:
    """UnsupportedOpError if an out= op would resize its ``out`` tensor ``target``."""
    if tuple(target.shape) != meta.shape:
        raise UnsupportedOpError(info.name, f"it would resize its output from {list(target.shape)} to "
                                 f"{list(meta.shape)}, and a {target.device} out= tensor cannot change "
                                 "shape; pass an out= tensor of the result's shape")


def fresh_alias(rec: Recorder, ref: Ref, meta: TensorMeta, known: dict[Ref, int]) -> Ref:
    """A new alias of ``ref``'s whole value (of metadata ``meta``), for the op to change."""
    node = rec.add(Node(rec.new_id(), "aten.alias.default", (ref,), outputs=(meta,), storages=(known[ref],),
                        module=module_path()))
    alias = Ref(node.id, 0)
    known[alias] = known[ref]
    return alias


def rebind(t: LazyTensor, rec: Recorder, node: Node, meta: TensorMeta, index: int = 0) -> None:
    """``t`` becomes value ``(node, index)`` of metadata ``meta``: the same Python object (and
    autograd identity), its sizes and strides changed."""
    t.data = LazyTensor(rec, node, index, meta, t._device)


def set_data(t: LazyTensor, new: torch.Tensor) -> None:
    """``t.data = new``: torch copies ``new``'s TensorImpl metadata into ``t``; ``t`` then stands
    for ``new``'s value too (it once kept standing for its old one)."""
    _DATA.__set__(t, new)
    if isinstance(new, LazyTensor):
        with new._rec.lock:
            t._rec, t._node, t._index = new._rec, new._node, new._index
            t._meta, t._device = new._meta, new._device
            new._rec.track(t)


def shallow_copy_compatible(a: torch.Tensor, b: torch.Tensor, *_: object) -> bool:
    """``set_data``'s question: two remote tensors are; a remote and a host one are not."""
    return isinstance(a, LazyTensor) and isinstance(b, LazyTensor)
