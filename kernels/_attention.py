"""Attention: the public entry point, its Triton launcher and its torch reference.

Layout is SDPA's: q is (batch, heads, q_len, head_dim), k and v are (batch, kv_heads, k_len,
head_dim) with ``heads % kv_heads == 0`` (grouped-query attention). The kernel itself is in
``_attention_kernel`` and is imported on the first Triton call only.

Inputs may be any strided view (for example ``(B, L, H, D).transpose(1, 2)``) as long as the last
dimension has stride 1; otherwise they are copied with ``.contiguous()``. The output is contiguous.

Causal masking is bottom-right aligned (query ``i`` sees key ``j`` iff ``j <= i + k_len - q_len``):
SDPA's ``is_causal`` when ``q_len == k_len``, the decode convention when ``q_len < k_len``, and rows
that see no key (``q_len > k_len``) are zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import (
    backend_for,
    check_launchable,
    check_like,
    check_no_grad,
    check_scale,
    check_tensor,
    unit_last_stride,
)

HEAD_DIMS = (16, 32, 64, 128, 256)


def _check(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
           k_name: str = "k", v_name: str = "v") -> float:
    """Validate the arguments shared by every attention entry point; return the softmax scale."""
    for name, t in (("q", q), (k_name, k), (v_name, v)):
        check_tensor(op, name, t, 4)
    check_like(op, k_name, k, "q", q)
    check_like(op, v_name, v, "q", q)
    check_scale(op, scale)
    if k.shape != v.shape:
        raise ValueError(f"{op}: {k_name} has shape {tuple(k.shape)} but {v_name} has {tuple(v.shape)}")
    (b, h, _, d), (bk, hk, _, dk) = q.shape, k.shape
    if bk != b:
        raise ValueError(f"{op}: {k_name} has batch {bk} but q has batch {b}")
    if dk != d:
        raise ValueError(f"{op}: {k_name} has head_dim {dk} but q has head_dim {d}")
    if hk == 0 or h % hk:
        raise ValueError(f"{op}: q has {h} heads, which is not a multiple of {k_name}'s {hk} heads")
    if d not in HEAD_DIMS:
        raise NotImplementedError(f"{op}: head_dim={d} is not implemented (supported: {HEAD_DIMS})")
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v, FlashAttention-style. Triton on CUDA; on CPU the torch reference,
    or the Triton kernel in the interpreter when ``GENIE_TRITON_INTERPRET=1``/``TRITON_INTERPRET=1``."""
    if backend_for(q.device if isinstance(q, torch.Tensor) else torch.device("cpu")) == "reference":
        return attention_reference(q, k, v, causal=causal, scale=scale)
    return attention_triton(q, k, v, causal=causal, scale=scale)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                     scale: float | None = None) -> torch.Tensor:
    """Always the Triton kernel: compiled on CUDA, interpreted elsewhere."""
    sm_scale = _check("attention", q, k, v, scale)
    check_launchable("attention", q.device)
    check_no_grad("attention", dict(q=q, k=k, v=v))
    from . import _attention_kernel

    return _attention_kernel.launch(unit_last_stride(q), unit_last_stride(k), unit_last_stride(v),
                                    bool(causal), sm_scale)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        scale: float | None = None) -> torch.Tensor:
    """The same computation with torch ops (SDPA), same conventions as the kernel."""
    sm_scale = _check("attention", q, k, v, scale)
    return _sdpa(q, k, v, causal, sm_scale)


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Bottom-right aligned causal mask, True where a query may see a key."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA with GQA expanded, bottom-right causal masking, and rows that see nothing set to 0."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    q_len, k_len = q.shape[2], k.shape[2]
    if causal and q_len != k_len:
        causal_part = causal_mask(q_len, k_len, q.device)
        mask = causal_part if mask is None else mask & causal_part
        causal = False
    if k_len == 0:
        return q.new_zeros(q.shape)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    if causal:
        mask = mask & causal_mask(q_len, k_len, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # SDPA's answer for a fully masked row depends on the backend (NaN or 0); the kernel's is 0.
    return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
