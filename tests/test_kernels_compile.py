"""The kernels compile for Hopper (sm_90) without a GPU, use tensor cores, and the autotune rules
only admit configs that fit; plus the config rules themselves.

Ahead-of-time compilation needs triton's NVIDIA backend and its bundled ptxas, not a driver. If
triton.language was imported with TRITON_INTERPRET=1 in this process, its helpers are interpreted and
nothing can be compiled: those tests skip.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from genie.kernels import _aot, _attention_kernel, _conv_kernel, _decode_kernel  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
H100_SMEM = _aot.H100_SMEM


def _probe(X):
    tl.store(X, 1.0)


@pytest.fixture(scope="module")
def hopper():
    if not isinstance(tl.standard._elementwise_max, JITFunction):
        pytest.skip("triton.language was imported with TRITON_INTERPRET=1 here: nothing compiles")
    try:
        _aot.compile_for(_probe, {"X": "fp32"}, {})
    except Exception as exc:  # no NVIDIA backend or ptxas in this triton build
        pytest.skip(f"cannot compile for sm_90 here: {exc}")
    return HOPPER


def _attention(target, dtype, head_dim, causal, bm, bn, warps, stages, **kw):
    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
    return _aot.attention_case(dtype, head_dim, causal, config, **kw).compile(target)


# A representative subset of bench/kernels_aot.py's sweep (which compiles every kept config, about
# three minutes on two cores): the table rows, both layouts, every path.
ATTENTION = [  # (dtype, head_dim, causal, bm, bn, warps, stages)
    ("fp16", 64, False, 128, 64, 8, 3),  # keep() drops w8 here; compiled to compare with the table
    ("fp16", 128, True, 128, 128, 8, 2),
    ("fp16", 128, False, 64, 128, 4, 2),  # spilled 4 B before
    ("bf16", 64, True, 64, 64, 4, 3),
    ("fp16", 256, True, 128, 64, 8, 2),
]


@pytest.mark.parametrize("dtype, head_dim, causal, bm, bn, warps, stages", ATTENTION)
def test_attention_uses_tma_and_wgmma_without_spills(hopper, dtype, head_dim, causal, bm, bn, warps, stages):
    r = _aot.report(_attention(hopper, dtype, head_dim, causal, bm, bn, warps, stages))
    assert r.spills == 0
    assert r.wgmma and r.tma
    assert r.shared <= H100_SMEM


def test_attention_even_k_drops_the_masked_loop(hopper):
    """Non-causal with k_len a multiple of BLOCK_N compiles one loop, not two."""
    masked = _attention(hopper, "fp16", 64, False, 128, 64, 8, 3, even_k=False).asm["ptx"]
    even = _attention(hopper, "fp16", 64, False, 128, 64, 8, 3, even_k=True).asm["ptx"]
    assert even.count("wgmma.mma_async") < masked.count("wgmma.mma_async")


def test_attention_pointer_path_pipelines(hopper):
    """Unaligned views take the pointer path: still wgmma, cp.async pipelining, and no spills."""
    r = _aot.report(_attention(hopper, "fp16", 128, True, 128, 64, 8, 3, use_tma=False))
    assert r.spills == 0 and r.wgmma and r.cp_async and not r.tma


def test_fp32_attention_is_routed_to_tf32_and_does_not_spill(hopper):
    """fp32 attention takes TF32 ("ieee" and "tf32x3" spill on Hopper); keep() drops the fp32 tiles
    that spill even so."""
    import torch

    assert _attention_kernel.dot_precision(torch.float32) == "tf32"
    for case in _aot.attention_cases(head_dims=(64,), dtypes=("fp32",), causal=(True,)):
        if case.constexprs["BLOCK_M"] * case.constexprs["BLOCK_N"] >= 128 * 64:  # the largest kept
            r = _aot.report(case.compile(hopper))
            assert r.spills == 0 and r.wgmma


CONV = [  # (ksize, bm, bn, bk, warps, stages, channels_last)
    (1, 128, 64, 64, 4, 4, True),
    (3, 128, 64, 64, 4, 4, True),
    (3, 128, 256, 64, 8, 3, True),
    (3, 64, 64, 32, 4, 5, False),  # the largest tile NCHW keeps
    (1, 64, 32, 32, 4, 5, False),
]


@pytest.mark.parametrize("ksize, bm, bn, bk, warps, stages, channels_last", CONV)
def test_conv_kept_configs_do_not_spill(hopper, ksize, bm, bn, bk, warps, stages, channels_last):
    from genie.kernels import _conv_kernel

    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                           num_stages=stages)
    assert _conv_kernel.keep(config, m=100352, c_in=256, c_out=512, elem_size=2, channels_last=channels_last)
    r = _aot.report(_aot.conv_case("fp16", ksize, config, channels_last=channels_last).compile(hopper))
    assert r.spills == 0
    assert r.wgmma
    if channels_last:  # 1x1 stride 1 is a TMA matmul; 3x3 gathers through cp.async
        assert r.tma if ksize == 1 else r.cp_async


def test_conv_1x1_path_keeps_cp_async_without_tma(hopper):
    """The constexpr 1x1 branch (strided or padded 1x1) keeps the channel runs aligned."""
    config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4,
                           num_stages=4)
    r = _aot.report(_aot.conv_case("fp16", 1, config, tma=False).compile(hopper))
    assert r.cp_async and r.spills == 0


def test_nchw_keeps_only_small_tiles():
    from genie.kernels import _conv_kernel

    shape = dict(m=100352, c_in=256, c_out=512, elem_size=2)
    nchw = [c for c in _conv_kernel.CONFIGS if _conv_kernel.keep(c, **shape, channels_last=False)]
    nhwc = [c for c in _conv_kernel.CONFIGS if _conv_kernel.keep(c, **shape)]
    assert nchw and len(nchw) < len(nhwc)
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 for c in nchw)


@pytest.mark.parametrize("head_dim, has_lens", [(128, True), (64, False)])
def test_decode_one_kernel_compiles_without_spills(hopper, head_dim, has_lens):
    block_m, block_n = _decode_kernel.block_sizes(head_dim, 1, interpret=False)
    r = _aot.report(_aot.decode_case("fp16", head_dim, block_m, block_n, has_lens).compile(hopper))
    assert r.spills == 0
    assert r.mma_sync and r.cp_async  # tensor cores for a 16-row tile; pipelined cache loads


def test_depthwise_compiles(hopper):
    r = _aot.report(_aot.depthwise_case().compile(hopper))
    assert r.spills == 0
    assert r.regs <= 255 and r.shared <= H100_SMEM


def test_row_offsets_are_64_bit(hopper):
    """The PTX forms row addresses with 64-bit multiplies (mul.wide), so an index past 2^31 does not
    wrap. (test_kernels_attention.py::test_offsets_past_int32 checks the values in the interpreter.)"""
    ptx = _attention(hopper, "fp16", 64, False, 64, 64, 4, 2, use_tma=False).asm["ptx"]
    assert "mul.wide.s32" in ptx or "mul.lo.s64" in ptx


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_largest_kept_attention_config_fits(hopper, head_dim):
    """keep()'s shared-memory estimate is an upper bound: its largest admitted config compiles and fits."""
    shape = dict(head_dim=head_dim, q_len=16384, k_len=16384, elem_size=2)
    kept = [c for c in _attention_kernel.CONFIGS if _attention_kernel.keep(c, **shape)]
    worst = max(kept, key=lambda c: (c.num_stages * 2 * c.kwargs["BLOCK_N"] + c.kwargs["BLOCK_M"]))
    r = _aot.report(_attention(hopper, "fp16", head_dim, True, worst.kwargs["BLOCK_M"],
                               worst.kwargs["BLOCK_N"], worst.num_warps, worst.num_stages))
    assert r.shared <= H100_SMEM
    assert r.spills == 0


# --- config rules (no compilation) -----------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("q_len, k_len", [(1, 1), (16, 4096), (100, 100), (16384, 16384)])
@pytest.mark.parametrize("elem_size", [2, 4])
def test_attention_keep_leaves_something(head_dim, q_len, k_len, elem_size):
    shape = dict(head_dim=head_dim, q_len=q_len, k_len=k_len, elem_size=elem_size)
    kept = [c for c in _attention_kernel.CONFIGS if _attention_kernel.keep(c, **shape)]
    assert kept
    assert all(c.kwargs["BLOCK_M"] <= max(64, 2 * q_len) for c in kept)  # no tile far past the queries
    if head_dim == 128:  # a 128x128 fp32 accumulator needs 8 warps
        assert all(c.num_warps == 8 for c in kept if c.kwargs["BLOCK_M"] == 128)


@pytest.mark.parametrize("m, c_in, c_out", [(49, 2048, 512), (100352, 64, 64), (12544, 3, 64), (1, 1, 1)])
def test_conv_keep_leaves_something(m, c_in, c_out):
    kept = [c for c in _conv_kernel.CONFIGS if _conv_kernel.keep(c, m=m, c_in=c_in, c_out=c_out, elem_size=2)]
    assert kept
    if c_in == 3:  # the stem: no 32/64-wide channel blocks that would be mostly padding
        assert all(c.kwargs["BLOCK_K"] == 16 for c in kept)


def test_decode_split_heuristic():
    assert _decode_kernel.num_splits(1, 100, 64, n_sm=132) == 1  # short cache: one chunk, no combine
    assert _decode_kernel.num_splits(1, 32768, 64, n_sm=132) == _decode_kernel.MAX_SPLITS  # split wide
    assert _decode_kernel.num_splits(64 * 8, 32768, 64, n_sm=132) == 1  # the grid is already full
    assert _decode_kernel.block_sizes(128, 1, interpret=False) == (16, 64)
    assert _decode_kernel.block_sizes(64, 8 * 16, interpret=False) == (64, 128)
