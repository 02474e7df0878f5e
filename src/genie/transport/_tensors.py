"""Tensors as wire buffers: a descriptor ``[dtype, shape]`` plus the contiguous bytes, no copies."""

from __future__ import annotations

import math

import torch

from genie._dtypes import DTYPES
from genie._errors import LocalProtocolError, RemoteProtocolError


def describe(t: torch.Tensor) -> list:
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise LocalProtocolError(f"a {t.dtype} tensor cannot go on the wire: only plain dtypes travel "
                                 "as bytes")
    return [name, list(t.shape)]


def as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, viewed in place when it is contiguous."""
    if t.device.type != "cpu":
        raise LocalProtocolError(f"only CPU tensors go on the wire, got one on {t.device}")
    t = t.detach()
    # a conjugate or negative view holds other bytes than its values: the values travel
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    n = t.numel()
    if n == 0:
        return memoryview(b"")
    # contiguous, yet a size-1 dim may carry any stride (``randn(()).expand(1, 1)`` has strides
    # (0, 0)), and ``reshape`` keeps it: name the n elements from the storage offset directly.
    # numpy has no bfloat16 and friends: view as bytes first (the array keeps ``t`` alive)
    flat = t.as_strided((n,), (1,), t.storage_offset())
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def parse_descriptor(desc: object) -> tuple[torch.dtype, tuple[int, ...], int]:
    """(dtype, shape, nbytes) of a received descriptor; RemoteProtocolError when it is malformed."""
    if not (isinstance(desc, list) and len(desc) == 2 and isinstance(desc[0], str)
            and isinstance(desc[1], list)):
        raise RemoteProtocolError(f"bad buffer descriptor {desc!r:.80}")
    dtype = DTYPES.get(desc[0])
    if dtype is None:
        raise RemoteProtocolError(f"dtype {desc[0]!r:.40} cannot be rebuilt from bytes")
    shape = desc[1]
    if len(shape) > 64 or not all(type(s) is int and 0 <= s < 1 << 48 for s in shape):
        raise RemoteProtocolError(f"bad tensor shape {shape!r:.80}")
    return dtype, tuple(shape), math.prod(shape) * dtype.itemsize


def from_bytes(payload: memoryview, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``payload[offset:]``, sharing its memory. Its storage starts at its first
    element (storage offset 0), so ``as_strided`` on it means what it means on a fresh tensor."""
    n = math.prod(shape) * dtype.itemsize
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(payload[offset : offset + n], dtype=dtype).view(shape)
