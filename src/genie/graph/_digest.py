"""A constant's name: the digest of its dtype, shape and bytes, made the same way on both sides.

Clients name weights by it, so equal weights share one upload; the server recomputes it for what
it receives, so a client cannot store other data under a name other clients' weights go by.
"""

from __future__ import annotations

import hashlib

import torch


def content_digest(t: torch.Tensor) -> str:
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
