"""The kernels compile for Hopper (sm_90) without a GPU, use tensor cores, and the autotune rules
only admit configs that fit; plus the config rules themselves.

Ahead-of-time compilation needs triton's NVIDIA backend and its bundled ptxas, not a driver. If
triton.language was imported with TRITON_INTERPRET=1 in this process, its helpers are interpreted and
nothing can be compiled: those tests skip.
"""

from __future__ import annotations

import inspect

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from genie.kernels import _attention_kernel, _conv_kernel, _decode_kernel  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
H100_SMEM = 227 * 1024  # bytes of shared memory one block may use


def _probe(X):
    tl.store(X, 1.0)


@pytest.fixture(scope="module")
def hopper():
    if not isinstance(tl.standard._elementwise_max, JITFunction):
        pytest.skip("triton.language was imported with TRITON_INTERPRET=1 here: nothing compiles")
    try:
        triton.compile(triton.compiler.ASTSource(JITFunction(_probe), {"X": "*fp32"}), target=HOPPER,
                       options=dict(enable_fp_fusion=True))
    except Exception as exc:  # no NVIDIA backend or ptxas in this triton build
        pytest.skip(f"cannot compile for sm_90 here: {exc}")
    return HOPPER


def compile_for(target, fn, pointers: dict[str, str], constexprs: dict, floats=(), **options):
    """Compile the plain kernel function ``fn``: listed pointers get their element type, ``floats`` are
    fp32, every other runtime argument is i32."""
    signature = {}
    for name in inspect.signature(fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    src = triton.compiler.ASTSource(JITFunction(fn), signature, constexprs)
    return triton.compile(src, target=target, options=dict(enable_fp_fusion=True, **options))


def _attention(target, dtype, head_dim, causal, bm, bn, warps, stages):
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, DOT_PRECISION="tf32")
    return compile_for(target, _attention_kernel._attn_fwd, dict.fromkeys(["Q", "K", "V", "Out"], dtype),
                       constexprs, floats=("sm_scale",), num_warps=warps, num_stages=stages)


@pytest.mark.parametrize("dtype, head_dim, causal, bm, bn, warps, stages", [
    ("bf16", 64, False, 64, 64, 4, 3),
    ("fp16", 128, True, 128, 64, 8, 3),
    ("fp16", 32, True, 64, 32, 4, 4),
    ("fp32", 64, False, 64, 32, 4, 2),
])
def test_attention_compiles_to_wgmma(hopper, dtype, head_dim, causal, bm, bn, warps, stages):
    kernel = _attention(hopper, dtype, head_dim, causal, bm, bn, warps, stages)
    assert "wgmma" in kernel.asm["ptx"]
    assert kernel.asm["cubin"]
    assert kernel.metadata.shared <= H100_SMEM


@pytest.mark.parametrize("partial, has_lens", [(True, False), (False, True)])
def test_decode_compiles(hopper, partial, has_lens):
    pointers = dict(Q="fp16", K="fp16", V="fp16", Out="fp32" if partial else "fp16")
    constexprs = dict(HEAD_DIM=128, BLOCK_M=16, BLOCK_N=64, HAS_LENS=has_lens, CAUSAL=True, PARTIAL=partial,
                      DOT_PRECISION="tf32")
    if has_lens:
        pointers["Lens"] = "i64"
    else:
        constexprs["Lens"] = None
    if partial:
        pointers["Lse"] = "fp32"
    else:
        constexprs["Lse"] = None
    split = compile_for(hopper, _decode_kernel._decode_split, pointers, constexprs, floats=("sm_scale",),
                        num_warps=4, num_stages=3)
    assert "mma" in split.asm["ptx"]  # tensor cores (mma.sync for a 16-row tile)
    reduce = compile_for(hopper, _decode_kernel._decode_reduce, dict(Part="fp32", Lse="fp32", Out="bf16"),
                         dict(HEAD_DIM=128, BLOCK_S=32), num_warps=4)
    assert reduce.asm["cubin"]


@pytest.mark.parametrize("dtype, act, with_bn, bm, bn, bk, warps, stages", [
    ("bf16", "relu", True, 64, 64, 32, 4, 4),
    ("fp16", "gelu", True, 128, 128, 64, 8, 3),
    ("fp16", "silu", False, 64, 64, 16, 4, 4),
])
def test_conv_compiles_to_wgmma(hopper, dtype, act, with_bn, bm, bn, bk, warps, stages):
    pointers = dict(X=dtype, W=dtype, Bias=dtype, Out=dtype)
    constexprs = dict(KH=3, KW=3, ACT=act, HAS_BIAS=True, HAS_BN=with_bn, HAS_AFFINE=with_bn,
                      DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    for name in ("Mean", "Var", "Gamma", "Beta"):
        if with_bn:
            pointers[name] = "fp32"
        else:
            constexprs[name] = None
    kernel = compile_for(hopper, _conv_kernel._conv_gemm, pointers, constexprs, floats=("eps",),
                         num_warps=warps, num_stages=stages)
    assert "wgmma" in kernel.asm["ptx"]
    assert kernel.metadata.shared <= H100_SMEM


def test_depthwise_compiles(hopper):
    pointers = dict(X="bf16", W="bf16", Bias="bf16", Mean="fp32", Var="fp32", Gamma="fp32", Beta="fp32",
                    Out="bf16")
    constexprs = dict(KH=3, KW=3, ACT="relu", HAS_BIAS=True, HAS_BN=True, HAS_AFFINE=True, BLOCK_C=16,
                      BLOCK_P=128)
    kernel = compile_for(hopper, _conv_kernel._conv_depthwise, pointers, constexprs, floats=("eps",),
                         num_warps=4)
    assert kernel.asm["cubin"]


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_largest_kept_attention_config_fits(hopper, head_dim):
    """keep()'s shared-memory estimate is an upper bound: its largest admitted config compiles and fits."""
    shape = dict(head_dim=head_dim, q_len=16384, k_len=16384, elem_size=2)
    kept = [c for c in _attention_kernel.CONFIGS if _attention_kernel.keep(c, **shape)]
    worst = max(kept, key=lambda c: (c.num_stages * 2 * c.kwargs["BLOCK_N"] + c.kwargs["BLOCK_M"]))
    kernel = _attention(hopper, "fp16", head_dim, True, worst.kwargs["BLOCK_M"], worst.kwargs["BLOCK_N"],
                        worst.num_warps, worst.num_stages)
    assert kernel.metadata.shared <= H100_SMEM


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
    assert _decode_kernel.num_splits(1, 100, 64, n_sm=132) == 1  # short cache: one chunk, no reduce
    assert _decode_kernel.num_splits(1, 32768, 64, n_sm=132) == 128  # one (batch, head): split wide
    assert _decode_kernel.num_splits(64 * 8, 32768, 64, n_sm=132) == 1  # the grid is already full
    assert _decode_kernel.block_sizes(128, 1, interpret=False) == (16, 64)
    assert _decode_kernel.block_sizes(64, 8 * 16, interpret=False) == (64, 128)
