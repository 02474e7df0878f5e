"""Flash-decoding in one launch: a few queries against a long KV cache. The Triton kernel, the split
heuristic, and the launcher. Imported lazily, on the first Triton call (see ``_dispatch``).

With one query per head a (batch, head) program would leave most of the GPU idle, so the key length
is split as well: each program takes one (batch, kv head, key chunk), writes a partial output and its
log-sum-exp to a workspace, and bumps a per-tile counter; the program that arrives last combines the
chunks and writes the output (the reduce step merged into the split kernel, as in split-K GEMMs). The
rows of a program are every (q head, query) pair that shares one k/v head, so with grouped-query
attention each key block is read once per group rather than once per q head.

Launch-light and capturable in a CUDA graph:
- the split count is fixed by the cache *capacity* and the SM count, never by ``cache_len``: each
  program works out its own chunk of the valid prefix, so the grid does not change as the cache
  fills, and a ``cache_len`` tensor is read on the device;
- the workspace and counters are allocated once per (device, stream, shape) and reused (counters are
  reset by the program that empties them); the SM count is read once per device.
An int ``cache_len`` is a kernel argument: fine eagerly, but a captured graph replays the value it
was captured with. Pass a tensor to capture.

Sizes come from heuristics, not autotuning: the work is memory-bound and the best split count
follows from the SM count and the cache length.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._attention_kernel import dot_precision
from ._dispatch import build, device_guard, interpreted, next_power_of_2
from ._tl import MAX as _MAX
from ._tl import SUM as _SUM


def _decode_split(
    Q, K, V, Lens, Out, Part, Lse, Count,  # pointers (Lens: per-batch cache lengths, or None)
    sm_scale, cache_len, capacity, q_len, kv_group, n_kv_heads,  # sizes
    stride_qb, stride_qh, stride_qm,  # strides (the head_dim stride is 1)
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bkv = tl.program_id(0)
    split = tl.program_id(1)
    b = (bkv // n_kv_heads).to(tl.int64)
    kvh = bkv % n_kv_heads
    seq_len = tl.minimum(tl.load(Lens + b).to(tl.int32), capacity) if HAS_LENS else cache_len

    # Row r of the tile is query (r % q_len) of q head (kvh * kv_group + r // q_len).
    local = tl.arange(0, BLOCK_M)
    rows = tl.program_id(2) * BLOCK_M + local
    row_ok = rows < kv_group * q_len
    head = (kvh * kv_group + rows // q_len).to(tl.int64)
    qi = rows % q_len
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None].to(tl.int64) * stride_qm
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + kvh.to(tl.int64) * stride_vh
    last_key = seq_len - q_len + qi  # causal, bottom-right: the queries are the last q_len positions

    qk_scale = sm_scale * 1.4426950408889634  # log2(e): softmax in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the scaled scores
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    # This program's chunk of the valid prefix, in whole key blocks.
    split_size = ((seq_len + SPLITS - 1) // SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * split_size
    hi = tl.minimum(lo + split_size, seq_len)
    # Pointers start at the chunk in int64 (capacity * stride may pass 2^31) and step by a block.
    first = (lo + offs_n).to(tl.int64)[:, None]
    k_ptrs = k_base + first * stride_kn + offs_d[None, :]
    v_ptrs = v_base + first * stride_vn + offs_d[None, :]
    k_step = tl.full([], BLOCK_N, tl.int64) * stride_kn
    v_step = tl.full([], BLOCK_N, tl.int64) * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + offs_n
        in_range = keys < hi
        k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
        k_ptrs += k_step
        v_ptrs += v_step
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        visible = in_range[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= last_key[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, _MAX) * qk_scale)  # the scale is positive
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: avoid -inf - -inf
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])  # one FMA per score
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows with no visible key in this chunk: 0, lse -inf
    o_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + qi[:, None].to(tl.int64) * stride_om \
        + offs_d[None, :]
    if SPLITS == 1:
        tl.store(o_ptrs, (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        # Workspace tile of this (batch, kv head, row block): SPLITS partial outputs and their lse.
        tile = (bkv * tl.num_programs(2) + tl.program_id(2)).to(tl.int64)
        part_tile = Part + tile * (SPLITS * BLOCK_M * HEAD_DIM) + local[:, None] * HEAD_DIM + offs_d[None, :]
        lse_tile = Lse + tile * (SPLITS * BLOCK_M) + local
        tl.store(part_tile + split * (BLOCK_M * HEAD_DIM), acc / l_safe[:, None])
        tl.store(lse_tile + split * BLOCK_M, tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe)))
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(Count + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:  # the last program of the tile combines: 2^(lse_s - max lse) weights
            m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_run = tl.full([BLOCK_M], 0.0, tl.float32)
            out = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
            for s in range(SPLITS):
                lse = tl.load(lse_tile + s * BLOCK_M, cache_modifier=".cg")  # L2: other SMs wrote it
                m_new = tl.maximum(m_run, lse)
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_run - m_sub)
                w = tl.math.exp2(lse - m_sub)
                part = tl.load(part_tile + s * (BLOCK_M * HEAD_DIM), cache_modifier=".cg")
                out = out * alpha[:, None] + w[:, None] * part
                l_run = l_run * alpha + w
                m_run = m_new
            out = out / tl.where(l_run == 0.0, 1.0, l_run)[:, None]
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
            tl.atomic_xchg(Count + tile, 0)  # ready for the next call


# --- heuristics ------------------------------------------------------------------------------------

MIN_SPLIT_KEYS = 256  # below this a chunk costs more in its combine than it saves
MAX_SPLITS = 64  # the combine walks the splits serially; past this the walk costs more than it saves
INTERPRET_BLOCK_N = 32
NUM_WARPS, NUM_STAGES = 4, 3


def block_sizes(head_dim: int, rows: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N). Rows are q heads per kv head times queries; tl.dot wants M >= 16."""
    block_m = min(64, max(16, next_power_of_2(rows)))
    if interpret:
        return block_m, INTERPRET_BLOCK_N
    return block_m, 128 if head_dim <= 64 else 64


def num_splits(batch_kv_heads: int, n_keys: int, block_n: int, n_sm: int) -> int:
    """Enough (batch, kv head, chunk) programs for two waves over the SMs, chunks of at least
    MIN_SPLIT_KEYS keys, at most one chunk per key block and at most MAX_SPLITS."""
    want = triton.cdiv(2 * n_sm, max(1, batch_kv_heads))
    most = max(1, triton.cdiv(n_keys, max(MIN_SPLIT_KEYS, block_n)))
    return max(1, min(want, most, MAX_SPLITS))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: a couple of programs per head keeps the split path exercised


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, tiles: int, splits: int, block_m: int,
               head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(partial outputs, lse, counters), allocated once per device, stream and size; the counters
    start at zero and the kernel leaves them at zero."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, tiles, splits, block_m, head_dim)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = (
            torch.empty((tiles, splits, block_m, head_dim), dtype=torch.float32, device=device),
            torch.empty((tiles, splits, block_m), dtype=torch.float32, device=device),
            torch.zeros((tiles,), dtype=torch.int32, device=device),
        )
    return ws


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_len: int | torch.Tensor,
           causal: bool, scale: float, splits: int | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Run the kernel on checked inputs: q (B, H, Lq, D); caches (B, Hkv, S, D), innermost stride 1;
    ``cache_len`` an int in [0, S] or a (B,) integer tensor on q's device. ``splits`` overrides the
    heuristic (tests); ``out`` (q's shape, dtype and device) saves the one allocation."""
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads, capacity = k.shape[1], k.shape[2]
    kv_group = n_heads // n_kv_heads
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out
    interpret = interpreted(q.device)
    has_lens = isinstance(cache_len, torch.Tensor)
    block_m, block_n = block_sizes(head_dim, kv_group * q_len, interpret)
    if splits is None:
        splits = num_splits(batch * n_kv_heads, capacity, block_n, _sm_count(q.device))
    row_blocks = triton.cdiv(kv_group * q_len, block_m)
    grid = (batch * n_kv_heads, splits, row_blocks)
    part, lse, count = (None, None, None) if splits == 1 else \
        _workspace(q.device, grid[0] * row_blocks, splits, block_m, head_dim)
    launch_opts = {} if interpret else dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=True)
    with device_guard(q.device):
        build(_decode_split, interpret)[grid](
            q, k, v, cache_len if has_lens else None, out, part, lse, count,
            scale, 0 if has_lens else int(cache_len), capacity, q_len, kv_group, n_kv_heads,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, SPLITS=splits, HAS_LENS=has_lens,
            CAUSAL=bool(causal), DOT_PRECISION=dot_precision(q.dtype), **launch_opts,
        )
    return out
