"""FlashAttention-style forward: the Triton kernel, its autotune configs and ``keep()`` rule, and the
launcher. Imported lazily, on the first Triton call (see ``_dispatch``).

One program computes a BLOCK_M x HEAD_DIM tile of the output for one (batch, head). It streams the
keys and values of that head in blocks of BLOCK_N and keeps a running max and sum (online softmax),
so the q_len x k_len score matrix is never written to memory. Scores are kept in base 2 (``exp2``) with the
``log2(e)`` factor folded into the softmax scale.

Causal masking is bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + (k_len - q_len)``.
For ``q_len == k_len`` that is exactly SDPA's ``is_causal``; for ``q_len < k_len`` it is the decode
convention (the queries are the last ``q_len`` positions). For ``q_len > k_len`` the first rows see no
key at all and are written as zeros.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._dispatch import build, device_guard, interpreted, next_power_of_2
from ._tl import MAX as _MAX
from ._tl import SUM as _SUM


def _attn_fwd(
    Q, K, V, Out,  # pointers
    sm_scale, n_heads, kv_group, q_len, k_len, q_bucket, k_bucket,  # sizes (buckets: autotune key only)
    stride_qb, stride_qh, stride_qm,  # strides (the head_dim stride is 1)
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    kvh = (h // kv_group).to(tl.int64)  # grouped-query attention: q heads share a k/v head
    h = h.to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    o_base = Out + b * stride_ob + h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # Row offsets in int64: a (B, L, H, D) view has a row stride of H*D, and L*H*D may pass 2^31.
    rows_m = offs_m.to(tl.int64)
    rows_n = offs_n.to(tl.int64)
    if USE_TMA:
        # One 2-D descriptor per (batch, head), shaped [len, HEAD_DIM]: a tile past the sequence end
        # is zero-filled by the TMA unit instead of reading the next head's rows.
        q_desc = tl.make_tensor_descriptor(q_base, [q_len, HEAD_DIM], [stride_qm, 1], [BLOCK_M, HEAD_DIM])
        k_desc = tl.make_tensor_descriptor(k_base, [k_len, HEAD_DIM], [stride_kn, 1], [BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, [k_len, HEAD_DIM], [stride_vn, 1], [BLOCK_N, HEAD_DIM])
        q = q_desc.load([start_m, 0])
    else:
        q = tl.load(q_base + rows_m[:, None] * stride_qm + offs_d[None, :], mask=offs_m[:, None] < q_len,
                    other=0.0)

    qk_scale = sm_scale * 1.4426950408889634  # log2(e): softmax in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the *scaled* scores
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)

    # Keys [0, split) are visible to every row of this tile: no mask. Keys [split, hi) need one
    # (sequence tail, and the causal diagonal band).
    if CAUSAL:
        diag = k_len - q_len
        hi = tl.maximum(tl.minimum(k_len, start_m + BLOCK_M + diag), 0)
        split = tl.maximum(tl.minimum(start_m + diag + 1, k_len), 0) // BLOCK_N * BLOCK_N
    else:
        diag = 0
        hi = k_len
        split = k_len // BLOCK_N * BLOCK_N

    # Unrolled at compile time into two loops that share one body: phase 0 unmasked, phase 1 masked.
    # Non-causal with k_len a multiple of BLOCK_N (EVEN_K) has no tail: phase 1 is not even compiled.
    for phase in tl.static_range(2):
        if phase == 0 or CAUSAL or not EVEN_K:
            if phase == 0:
                lo = 0
                end = split
            else:
                lo = split
                end = hi
            for start_n in range(lo, end, BLOCK_N):
                if USE_TMA:  # out-of-range rows arrive as zeros; phase 1 masks their scores below
                    k = k_desc.load([start_n, 0])
                    v = v_desc.load([start_n, 0])
                elif phase == 0:
                    k = tl.load(k_base + (start_n + rows_n)[:, None] * stride_kn + offs_d[None, :])
                    v = tl.load(v_base + (start_n + rows_n)[:, None] * stride_vn + offs_d[None, :])
                else:
                    in_range = (start_n + offs_n)[:, None] < k_len
                    k = tl.load(k_base + (start_n + rows_n)[:, None] * stride_kn + offs_d[None, :],
                                mask=in_range, other=0.0)
                    v = tl.load(v_base + (start_n + rows_n)[:, None] * stride_vn + offs_d[None, :],
                                mask=in_range, other=0.0)
                qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                if phase == 1:
                    visible = (start_n + offs_n)[None, :] < k_len
                    if CAUSAL:
                        visible = visible & ((start_n + offs_n)[None, :] <= offs_m[:, None] + diag)
                    qk = tl.where(visible, qk, float("-inf"))
                # The scale goes into the max (it is positive) and into exp2's argument as one FMA.
                m_new = tl.maximum(m_i, tl.reduce(qk, 1, _MAX) * qk_scale)
                m_sub = m_new
                if phase == 1:
                    # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so
                    # that exp2 gives 0 rather than NaN.
                    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_sub)
                p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
                l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
                m_i = m_new

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows with no visible key are written as zeros
    out = (acc / l_i[:, None]).to(Out.dtype.element_ty)
    if USE_TMA:
        o_desc = tl.make_tensor_descriptor(o_base, [q_len, HEAD_DIM], [stride_om, 1], [BLOCK_M, HEAD_DIM])
        o_desc.store([start_m, 0], out)
    else:
        tl.store(o_base + rows_m[:, None] * stride_om + offs_d[None, :], out, mask=offs_m[:, None] < q_len)


# --- configs ---------------------------------------------------------------------------------------

# Interpreter (CPU tests): small blocks keep a program instance under a millisecond.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}

CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm in (64, 128)
    for bn in (32, 64, 128)
    for w in (4, 8)
    for s in (2, 3, 4)
]

_SMEM_BYTES = 200 * 1024  # H100 has 227 KiB per block; keep headroom for the compiler's scratch


def keep(config: triton.Config, *, head_dim: int, q_len: int, k_len: int, elem_size: int) -> bool:
    """Whether an autotune config is worth timing for this problem."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    w, s = config.num_warps, config.num_stages
    if bm > max(64, next_power_of_2(q_len)) or bn > max(32, next_power_of_2(k_len)):
        return False  # tiles larger than the problem only add masked work
    big_acc = bm * head_dim >= 128 * 128
    if big_acc and w < 8:
        return False  # the fp32 accumulator alone would take 128 registers per thread
    if not big_acc and w == 8 and bm * bn < 128 * 128:
        return False  # too little work per warp to feed wgmma
    if head_dim >= 256 and (bn > 64 or s > 2):
        return False
    if elem_size == 4 and w == 4 and bm * bn >= 128 * 64:
        return False  # fp32 tiles this size spill with four warps (bench/kernels_aot.py)
    # K and V tiles per pipeline stage, plus the resident Q tile.
    return (s * 2 * bn + bm) * head_dim * elem_size <= _SMEM_BYTES


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    shape = dict(head_dim=kwargs["HEAD_DIM"], q_len=named_args["q_len"], k_len=named_args["k_len"],
                 elem_size=named_args["Q"].element_size())
    kept = [c for c in configs if keep(c, **shape)]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages))]


def _bucket(n: int) -> int:
    # Autotune per power-of-two length so a new prompt length does not trigger a new search.
    return max(16, next_power_of_2(n))


def _even_k(args: dict) -> bool:
    return args["k_len"] % args["BLOCK_N"] == 0


@functools.cache
def _autotuned():
    # EVEN_K depends on the config's BLOCK_N, so it is a heuristic evaluated after the config is
    # picked; USE_TMA and DOT_PRECISION are part of the key because they change the compiled code.
    return triton.autotune(
        configs=CONFIGS, key=["q_bucket", "k_bucket", "HEAD_DIM", "CAUSAL", "USE_TMA", "DOT_PRECISION"],
        prune_configs_by={"early_config_prune": _prune},
    )(triton.heuristics({"EVEN_K": _even_k})(build(_attn_fwd, False)))


def dot_precision(dtype: torch.dtype) -> str:
    """Always "tf32": fp16/bf16 ignore it, and fp32 runs on TF32 tensor cores whatever torch's
    ``allow_tf32`` says. Compiled for sm_90, "ieee" spills tens of KB per thread at every tile and
    "tf32x3" (three TF32 products) spills at all but the smallest tiles; TF32 compiles without spills
    in every kept config. fp32 results therefore match SDPA to about 1e-3, not 1e-6."""
    return "tf32"


def tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need a 16-byte aligned base and 16-byte multiples for every stride but the
    last (and Hopper or newer on a GPU)."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any((s * size) % 16 for s in t.stride()[:-1]):
            return False
    device = tensors[0].device
    return device.type != "cuda" or _capability(device.index)[0] >= 9


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _ensure_allocator() -> None:
    """Device-side descriptors need a little global scratch per launch; Triton asks its allocator."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
           use_tma: bool | None = None) -> torch.Tensor:
    """Run the kernel on checked inputs: (B, H, Lq, D) queries, (B, Hkv, Lk, D) keys and values,
    innermost stride 1. ``use_tma`` overrides the alignment rule (tests)."""
    batch, n_heads, q_len, head_dim = q.shape
    kv_group = n_heads // k.shape[1]
    k_len = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out
    interpret = interpreted(q.device)
    if use_tma is None:
        use_tma = k_len > 0 and tma_ok(q, k, v, out)
    args = (
        q, k, v, out,
        scale, n_heads, kv_group, q_len, k_len, _bucket(q_len), _bucket(k_len),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
    )
    meta = dict(HEAD_DIM=head_dim, CAUSAL=bool(causal), USE_TMA=bool(use_tma),
                DOT_PRECISION=dot_precision(q.dtype))
    if interpret:
        grid = (triton.cdiv(q_len, INTERPRET_CONFIG["BLOCK_M"]), batch * n_heads)
        even = k_len % INTERPRET_CONFIG["BLOCK_N"] == 0
        build(_attn_fwd, True)[grid](*args, **meta, **INTERPRET_CONFIG, EVEN_K=even)
    else:
        if use_tma:
            _ensure_allocator()
        grid = lambda META: (triton.cdiv(q_len, META["BLOCK_M"]), batch * n_heads)
        with device_guard(q.device):
            _autotuned()[grid](*args, **meta, enable_fp_fusion=True)
    return out
