"""``torch.save`` and ``torch.load`` of remote tensors, as for CUDA ones.

Saved, a remote tensor is its value as a host tensor (a Parameter stays one), which ``torch.load``'s
default (``weights_only=True``) accepts. Loaded with ``map_location`` naming this device, each
stored storage becomes a ``_HostStorage`` (its bytes on the host, its ``device`` this one); torch
rebuilds each tensor as an empty on that device and ``set_``s it onto the storage, which
``set_storage`` records as a view of one upload of the whole storage, so tensors that shared a
storage in the file still share one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from genie.lazy._lazy import LazyTensor, _default, materialize

aten = torch.ops.aten


def reduce_to_host(t: LazyTensor, protocol: int) -> Any:
    """``LazyTensor.__reduce_ex__``: pickled as the host tensor of its value."""
    (value,) = materialize([t])
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(value, t.requires_grad).__reduce_ex__(protocol)
    return value.requires_grad_(t.requires_grad).__reduce_ex__(protocol)


class _HostStorage(torch.UntypedStorage):
    """A stored storage's bytes on the host, bound for a remote device."""

    @property
    def device(self) -> torch.device:
        return self._genie_device


def _restore_storage(storage: torch.UntypedStorage, location: str) -> _HostStorage | None:
    """``torch.serialization``'s deserializer for this device's locations (None: not ours)."""
    if not location.startswith(torch._C._get_privateuse1_backend_name()):
        return None
    host = _HostStorage(storage.nbytes())
    host.copy_(storage)
    host._genie_device, host._genie_flats = torch.device(location), {}
    return host


def set_storage(func, args: tuple, kwargs: dict) -> Any:
    """``empty.set_(storage, offset, size, stride)`` onto a ``_HostStorage``: a view of its upload."""
    t, storage = args[0], args[1]
    if not isinstance(storage, _HostStorage) or not isinstance(t, LazyTensor):
        return _default(func, args, kwargs)  # recorded: the server refuses storages, naming the op
    if func is aten.set_.source_Storage:
        offset, size, stride = 0, (storage.nbytes() // t.element_size(),), (1,)
    else:
        offset, size, *rest = (*args[2:], *kwargs.values())  # a stride of [] (contiguous) is left out
        stride = rest[0] if rest and len(rest[0]) == len(size) else torch.empty(size, device="meta").stride()
    flat = storage._genie_flats.get(t.dtype)
    if flat is None:
        whole = torch.empty(0, dtype=t.dtype).set_(storage)
        flat = storage._genie_flats[t.dtype] = whole.to(t.device)
    t.data = flat.as_strided(size, stride, offset)
    return t


def install(special: dict[Any, Callable]) -> None:
    """Hook the ops above into the dispatch table, and the deserializer into torch.serialization
    (ahead of PrivateUse1's own, which would need real storages on the device)."""
    special[aten.set_.source_Storage] = set_storage
    special[aten.set_.source_Storage_storage_offset] = set_storage
    torch.serialization.register_package(19, lambda storage: None, _restore_storage)
