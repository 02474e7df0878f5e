"""Decode attention: a few new queries (q_len 1..16) against a KV cache. The public entry point, its
Triton launcher and its torch reference; the kernels are in ``_decode_kernel`` (flash-decoding).

q is (batch, heads, q_len, head_dim); k_cache and v_cache are (batch, kv_heads, capacity, head_dim),
of which the first ``cache_len`` positions are valid. ``cache_len`` is an int in [0, capacity] or a
(batch,) integer tensor on q's device (one length per sequence; values above capacity are clamped).

The queries are the last ``q_len`` positions of the valid prefix, so with ``causal=True`` (the
default) query ``i`` sees keys ``j <= cache_len - q_len + i``: the same bottom-right convention as
``attention(causal=True)``. With ``causal=False`` every query sees the whole prefix. Rows that see no
key are zeros. Strides and copies are as for ``attention``.
"""

from __future__ import annotations

import operator

import torch

from ._attention import _check as _check_attention
from ._attention import _sdpa
from ._dispatch import backend_for, check_launchable, check_no_grad, unit_last_stride

MAX_Q_LEN = 16
_OP = "decode_attention"


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: int | torch.Tensor,
           scale: float | None) -> tuple[float, int | torch.Tensor]:
    sm_scale = _check_attention(_OP, q, k_cache, v_cache, scale, "k_cache", "v_cache")
    q_len, capacity = q.shape[2], k_cache.shape[2]
    if not 1 <= q_len <= MAX_Q_LEN:
        raise ValueError(f"{_OP}: q_len={q_len} is outside 1..{MAX_Q_LEN}; use attention() for prefill")
    if isinstance(cache_len, torch.Tensor):
        if cache_len.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{_OP}: cache_len tensor has dtype {cache_len.dtype}; expected int32 or int64")
        if cache_len.shape != (q.shape[0],):
            raise ValueError(f"{_OP}: cache_len tensor must have shape ({q.shape[0]},) (one length per "
                             f"batch entry), got {tuple(cache_len.shape)}")
        if cache_len.device != q.device:
            raise ValueError(f"{_OP}: cache_len is on {cache_len.device} but q is on {q.device}")
        return sm_scale, cache_len
    if isinstance(cache_len, bool):
        raise TypeError(f"{_OP}: cache_len must be an int or a tensor, got bool")
    try:
        length = operator.index(cache_len)
    except TypeError:
        kind = type(cache_len).__name__
        raise TypeError(f"{_OP}: cache_len must be an int or a tensor, got {kind}") from None
    if not 0 <= length <= capacity:
        raise ValueError(f"{_OP}: cache_len={length} is outside [0, {capacity}] (the cache capacity)")
    return sm_scale, length


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_len: int | torch.Tensor, *, scale: float | None = None,
                     causal: bool = True) -> torch.Tensor:
    """Attention of q against the valid prefix of the cache. Triton (flash-decoding) on CUDA; on CPU
    the torch reference, or the interpreter when ``GENIE_TRITON_INTERPRET=1``/``TRITON_INTERPRET=1``."""
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    if backend_for(device) == "reference":
        return decode_attention_reference(q, k_cache, v_cache, cache_len, scale=scale, causal=causal)
    return decode_attention_triton(q, k_cache, v_cache, cache_len, scale=scale, causal=causal)


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_len: int | torch.Tensor, *, scale: float | None = None,
                            causal: bool = True) -> torch.Tensor:
    """Always the Triton kernels: compiled on CUDA, interpreted elsewhere."""
    sm_scale, length = _check(q, k_cache, v_cache, cache_len, scale)
    check_launchable(_OP, q.device)
    check_no_grad(_OP, dict(q=q, k_cache=k_cache, v_cache=v_cache))
    from . import _decode_kernel

    return _decode_kernel.launch(unit_last_stride(q), unit_last_stride(k_cache), unit_last_stride(v_cache),
                                 length, bool(causal), sm_scale)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               cache_len: int | torch.Tensor, *, scale: float | None = None,
                               causal: bool = True) -> torch.Tensor:
    """The same computation with torch ops (SDPA over the valid prefix)."""
    sm_scale, length = _check(q, k_cache, v_cache, cache_len, scale)
    if not isinstance(length, torch.Tensor):
        return _sdpa(q, k_cache[:, :, :length], v_cache[:, :, :length], bool(causal), sm_scale)
    q_len, capacity = q.shape[2], k_cache.shape[2]
    keys = torch.arange(capacity, device=q.device)
    lens = length.clamp(max=capacity)[:, None, None]  # (B, 1, 1)
    visible = keys < lens  # (B, 1, S)
    if causal:
        queries = torch.arange(q_len, device=q.device)[:, None]  # (Lq, 1)
        visible = visible & (keys <= lens - q_len + queries)  # (B, Lq, S)
    return _sdpa(q, k_cache, v_cache, False, sm_scale, mask=visible[:, None])
