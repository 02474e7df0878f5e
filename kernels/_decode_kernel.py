"""Flash-decoding: a few queries against a long KV cache. The two Triton kernels, the split heuristic,
and the launcher. Imported lazily, on the first Triton call (see ``_dispatch``).

With one query per head a (batch, head) program would leave most of the GPU idle, so the key length
is split as well: ``_decode_split`` gives each program one (batch, kv head, key chunk) and writes a
partial output with its log-sum-exp; ``_decode_reduce`` combines the chunks. The rows of a program
are every (q head, query) pair that shares one k/v head, so with grouped-query attention each key
block is read once per group rather than once per q head. One chunk skips the reduce kernel.

Sizes come from heuristics, not autotuning: the work is memory-bound and the best split count
follows from the SM count and the cache length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._attention_kernel import dot_precision
from ._dispatch import build, device_guard, interpreted, next_power_of_2
from ._tl import MAX as _MAX
from ._tl import SUM as _SUM


def _decode_split(
    Q, K, V, Lens, Out, Lse,  # pointers (Lens: per-batch cache lengths, or None)
    sm_scale, cache_len, capacity, q_len, kv_group, n_kv_heads, split_size,  # sizes
    stride_qb, stride_qh, stride_qm,  # strides (the head_dim stride is 1)
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_os,  # Out: (B, H, Lq, splits, D), or (B, H, Lq, D)
    stride_lb, stride_lh, stride_lm,  # Lse: (B, H, Lq, splits), splits contiguous
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, PARTIAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bkv = tl.program_id(0)
    split = tl.program_id(1)
    b = (bkv // n_kv_heads).to(tl.int64)
    kvh = bkv % n_kv_heads
    seq_len = tl.minimum(tl.load(Lens + b).to(tl.int32), capacity) if HAS_LENS else cache_len

    # Row r of the tile is query (r % q_len) of q head (kvh * kv_group + r // q_len).
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < kv_group * q_len
    head = (kvh * kv_group + rows // q_len).to(tl.int64)
    qi = rows % q_len
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_ptrs = K + b * stride_kb + kvh.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + kvh.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    last_key = seq_len - q_len + qi  # causal, bottom-right: the queries are the last q_len positions

    qk_scale = sm_scale * 1.4426950408889634  # log2(e): softmax in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    lo = split * split_size
    hi = tl.minimum(lo + split_size, seq_len)
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + offs_n
        in_range = keys < hi
        k = tl.load(k_ptrs + start_n * stride_kn, mask=in_range[:, None], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=in_range[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = in_range[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= last_key[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, _MAX))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: avoid -inf - -inf
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(qk - m_sub[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows with no visible key in this chunk: 0, lse -inf
    out = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_om + offs_d[None, :]
    if PARTIAL:
        tl.store(o_ptrs + split * stride_os, out, mask=row_ok[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        tl.store(Lse + b * stride_lb + head * stride_lh + qi * stride_lm + split, lse, mask=row_ok)
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


def _decode_reduce(
    Part, Lse, Out,  # pointers
    n_splits, n_heads, q_len,  # sizes
    stride_pb, stride_ph, stride_pm, stride_ps,  # strides
    stride_lb, stride_lh, stride_lm,
    stride_ob, stride_oh, stride_om,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // (n_heads * q_len)).to(tl.int64)
    h = ((row // q_len) % n_heads).to(tl.int64)
    m = row % q_len
    offs_d = tl.arange(0, HEAD_DIM)
    part_ptrs = Part + b * stride_pb + h * stride_ph + m * stride_pm
    lse_ptrs = Lse + b * stride_lb + h * stride_lh + m * stride_lm

    # Online combine over chunks of BLOCK_S splits: the weight of split s is 2^(lse_s - max lse).
    m_run = tl.full([], float("-inf"), tl.float32)
    l_run = tl.full([], 0.0, tl.float32)
    acc = tl.full([HEAD_DIM], 0.0, tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(lse_ptrs + offs_s, mask=offs_s < n_splits, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.reduce(lse, 0, _MAX))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_run - m_sub)
        w = tl.math.exp2(lse - m_sub)
        part = tl.load(part_ptrs + offs_s[:, None] * stride_ps + offs_d[None, :],
                       mask=offs_s[:, None] < n_splits, other=0.0)
        acc = acc * alpha + tl.reduce(w[:, None] * part, 0, _SUM)
        l_run = l_run * alpha + tl.reduce(w, 0, _SUM)
        m_run = m_new
    out = acc / tl.where(l_run == 0.0, 1.0, l_run)
    tl.store(Out + b * stride_ob + h * stride_oh + m * stride_om + offs_d, out.to(Out.dtype.element_ty))


# --- heuristics ------------------------------------------------------------------------------------

MIN_SPLIT_KEYS = 256  # below this a chunk costs more in launch and reduce than it saves
INTERPRET_BLOCK_N = 32


def block_sizes(head_dim: int, rows: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N). Rows are q heads per kv head times queries; tl.dot wants M >= 16."""
    block_m = min(64, max(16, next_power_of_2(rows)))
    if interpret:
        return block_m, INTERPRET_BLOCK_N
    return block_m, 128 if head_dim <= 64 else 64


def num_splits(batch_kv_heads: int, n_keys: int, block_n: int, n_sm: int) -> int:
    """Enough (batch, kv head, chunk) programs for two waves over the SMs, chunks of at least
    MIN_SPLIT_KEYS keys, at most one chunk per key block."""
    want = triton.cdiv(2 * n_sm, max(1, batch_kv_heads))
    most = max(1, triton.cdiv(n_keys, max(MIN_SPLIT_KEYS, block_n)))
    return max(1, min(want, most))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: a couple of programs per head keeps the split path exercised


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_len: int | torch.Tensor,
           causal: bool, scale: float, splits: int | None = None) -> torch.Tensor:
    """Run the kernels on checked inputs: q (B, H, Lq, D); caches (B, Hkv, S, D), innermost stride 1;
    ``cache_len`` an int in [0, S] or a (B,) integer tensor on q's device. ``splits`` overrides the
    heuristic (tests)."""
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads, capacity = k.shape[1], k.shape[2]
    kv_group = n_heads // n_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out
    interpret = interpreted(q.device)
    has_lens = isinstance(cache_len, torch.Tensor)
    n_keys = capacity if has_lens else int(cache_len)
    block_m, block_n = block_sizes(head_dim, kv_group * q_len, interpret)
    if splits is None:
        splits = num_splits(batch * n_kv_heads, n_keys, block_n, _sm_count(q.device))
    split_size = triton.cdiv(triton.cdiv(max(n_keys, 1), splits), block_n) * block_n
    splits = max(1, triton.cdiv(n_keys, split_size))
    partial = splits > 1
    if partial:
        part = torch.empty((batch, n_heads, q_len, splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, n_heads, q_len, splits), dtype=torch.float32, device=q.device)
        o_strides, lse_strides = part.stride()[:4], lse.stride()[:3]
    else:
        part, lse = out, None
        o_strides, lse_strides = (*out.stride()[:3], 0), (0, 0, 0)
    grid = (batch * n_kv_heads, splits, triton.cdiv(kv_group * q_len, block_m))
    launch_opts = {} if interpret else dict(num_warps=4, num_stages=3, enable_fp_fusion=True)
    with device_guard(q.device):
        build(_decode_split, interpret)[grid](
            q, k, v, cache_len if has_lens else None, part, lse,
            scale, 0 if has_lens else int(cache_len), capacity, q_len, kv_group, n_kv_heads, split_size,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *o_strides, *lse_strides,
            HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_LENS=has_lens, CAUSAL=bool(causal),
            PARTIAL=partial, DOT_PRECISION=dot_precision(q.dtype), **launch_opts,
        )
        if partial:
            build(_decode_reduce, interpret)[(batch * n_heads * q_len,)](
                part, lse, out,
                splits, n_heads, q_len,
                *part.stride()[:4], *lse.stride()[:3], *out.stride()[:3],
                HEAD_DIM=head_dim, BLOCK_S=min(32, next_power_of_2(splits)),
                **({} if interpret else dict(num_warps=4, enable_fp_fusion=True)),
            )
    return out

