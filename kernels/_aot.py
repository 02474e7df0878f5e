"""Ahead-of-time compilation for Hopper (sm_90) on any machine: no GPU or driver, only triton's NVIDIA
backend and its bundled ptxas. Used by tests/test_kernels_compile.py and bench/kernels_aot.py to read
what each kept config compiles to: registers and spills (ptxas -v), shared memory, and whether the
PTX uses wgmma, TMA, cp.async or mma.sync.

Imported on demand only; it imports triton at the top, so never from ``genie.kernels.__init__``.
"""

from __future__ import annotations

import functools
import inspect
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

HOPPER = GPUTarget("cuda", 90, 32)
H100_SMEM = 227 * 1024  # bytes of shared memory one block may use


@functools.cache
def _jit(fn: Callable) -> JITFunction:
    return JITFunction(fn)


def compile_for(fn: Callable, pointers: dict[str, str], constexprs: dict, floats: tuple[str, ...] = (),
                target: GPUTarget = HOPPER, aligned: tuple[str, ...] | None = None,
                **options) -> triton.compiler.CompiledKernel:
    """Compile the plain kernel function ``fn`` as a launch would: listed pointers get their element
    type and, like every pointer a torch allocation gives, 16-byte alignment; ``floats`` are fp32;
    every other runtime argument is i32 (what Triton picks below 2^31). The ints named in ``aligned``
    (default: every ``stride*``) are marked divisible by 16, as Triton's launcher marks them for
    ordinary shapes; without that the compiler cannot vectorise a single load."""
    signature, attrs = {}, {}
    for i, name in enumerate(inspect.signature(fn).parameters):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
        is_aligned = name.startswith("stride") if aligned is None else name in aligned
        if name in pointers or (is_aligned and name not in floats):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(_jit(fn), signature, constexprs, attrs)
    return triton.compile(src, target=target, options=dict(enable_fp_fusion=True, **options))


@dataclass(frozen=True)
class Report:
    """What one compiled kernel uses, per thread (registers, spills) and per block (shared)."""

    regs: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared: int  # bytes
    wgmma: bool
    tma: bool
    cp_async: bool
    mma_sync: bool

    @property
    def spills(self) -> int:
        return max(self.spill_stores, self.spill_loads)

    def as_dict(self) -> dict:
        return asdict(self)


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_log(ptx: str, arch: str = "sm_90a") -> str:
    """``ptxas -v`` on the PTX, with the flags Triton's own build passes."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([get_ptxas(90).path, "-v", "-lineinfo", "--regAllocOptLevel=2",
                               f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, check=True)
    return done.stderr + done.stdout


def report(kernel: triton.compiler.CompiledKernel) -> Report:
    ptx = kernel.asm["ptx"]
    log = ptxas_log(ptx)
    regs = _REGS.search(log)
    spills = _SPILLS.search(log)
    if regs is None or spills is None:
        raise RuntimeError(f"could not read registers/spills from the ptxas log:\n{log}")
    return Report(
        regs=int(regs.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
        shared=int(kernel.metadata.shared),
        wgmma="wgmma.mma_async" in ptx,
        tma="cp.async.bulk.tensor" in ptx,
        cp_async=re.search(r"cp\.async\.c[ag]\.", ptx) is not None,
        mma_sync="mma.sync" in ptx,
    )


# --- the sweep: every config each kernel's keep() rule admits, on representative shapes ------------


@dataclass(frozen=True)
class Case:
    kernel: str  # "attention", "decode", "conv", "conv1x1", "depthwise"
    label: str  # shape and config, for tables
    fn: Callable
    pointers: dict
    constexprs: dict
    floats: tuple[str, ...]
    options: dict  # num_warps, num_stages
    aligned: tuple[str, ...] | None = None  # see compile_for

    def compile(self, target: GPUTarget = HOPPER) -> triton.compiler.CompiledKernel:
        return compile_for(self.fn, self.pointers, self.constexprs, self.floats, target, self.aligned,
                           **self.options)


def attention_case(dtype: str, head_dim: int, causal: bool, config: triton.Config, *, use_tma: bool = True,
                   even_k: bool = False, precision: str = "tf32") -> Case:
    from ._attention_kernel import _attn_fwd

    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, EVEN_K=even_k,
                      USE_TMA=use_tma,
                      DOT_PRECISION=precision)
    label = (f"{dtype} d{head_dim} {'causal' if causal else 'full'} {bm}x{bn} w{config.num_warps} "
             f"s{config.num_stages}{'' if use_tma else ' ptr'}")
    return Case("attention", label, _attn_fwd, dict.fromkeys(["Q", "K", "V", "Out"], dtype), constexprs,
                ("sm_scale",), dict(num_warps=config.num_warps, num_stages=config.num_stages))


def attention_cases(head_dims: tuple[int, ...] = (64, 128), dtypes: tuple[str, ...] = ("fp16",),
                    causal: tuple[bool, ...] = (False, True)) -> Iterator[Case]:
    """Every config keep() admits for a long sequence (the shape that keeps the most)."""
    from ._attention_kernel import CONFIGS, keep

    for dtype in dtypes:
        size = 4 if dtype == "fp32" else 2
        for d in head_dims:
            for c in CONFIGS:
                if keep(c, head_dim=d, q_len=16384, k_len=16384, elem_size=size):
                    for cz in causal:
                        yield attention_case(dtype, d, cz, c)


def conv_case(dtype: str, ksize: int, config: triton.Config, *, channels_last: bool = True,
              act: str = "relu", tma: bool | None = None) -> Case:
    """``tma`` None: the path the launcher picks for a stride-1 unpadded conv (TMA for 1x1 NHWC)."""
    from ._conv_kernel import _conv_gemm

    if tma is None:
        tma = ksize == 1 and channels_last
    pointers = dict(X=dtype, W=dtype, Bias=dtype, Out=dtype, Mean="fp32", Var="fp32", Gamma="fp32",
                    Beta="fp32")
    constexprs = dict(KH=ksize, KW=ksize, ACT=act, HAS_BIAS=False, HAS_BN=True, HAS_AFFINE=True,
                      DOT_PRECISION="tf32", MATMUL_TMA=tma, **config.kwargs)
    constexprs["Bias"] = None
    if channels_last:  # NHWC input and output, weights (out, kh, kw, in): channel strides are 1
        constexprs.update(sxc=1, swc=1, soc=1)
    kw = config.kwargs
    label = (f"{dtype} {ksize}x{ksize}{' tma' if tma else ''} {'nhwc' if channels_last else 'nchw'} "
             f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{config.num_warps} s{config.num_stages}")
    return Case("conv1x1" if ksize == 1 else "conv", label, _conv_gemm, pointers, constexprs, ("eps",),
                dict(num_warps=config.num_warps, num_stages=config.num_stages), CONV_ALIGNED)


# ResNet-50's channel counts are multiples of 16 (the stem aside), so Triton's launcher marks these.
CONV_ALIGNED = ("c_in", "c_out", "sxn", "sxc", "sxh", "sxw", "swo", "swc", "swh", "sww", "son", "soc", "soh",
                "sow")
CONV_SHAPES = ((100352, 64, 64), (12544, 256, 512), (784, 512, 2048))  # (m, c_in, c_out), ResNet-50


def conv_cases(dtypes: tuple[str, ...] = ("fp16",), ksizes: tuple[int, ...] = (1, 3),
               layouts: tuple[bool, ...] = (True, False)) -> Iterator[Case]:
    """Every config keep() admits for some ResNet-50 layer, per layout (channels-last is what the plan
    feeds; NCHW input keeps its own, smaller set)."""
    from ._conv_kernel import CONFIGS, keep

    for cl in layouts:
        kept = [c for c in CONFIGS if any(keep(c, m=m, c_in=ci, c_out=co, elem_size=2, channels_last=cl)
                                          for m, ci, co in CONV_SHAPES)]
        for dtype in dtypes:
            for k in ksizes:
                for c in kept:
                    yield conv_case(dtype, k, c, channels_last=cl)


def decode_case(dtype: str, head_dim: int, block_m: int, block_n: int, has_lens: bool = True,
                splits: int = 16) -> Case:
    from ._decode_kernel import NUM_STAGES, NUM_WARPS, _decode_split

    pointers = dict(Q=dtype, K=dtype, V=dtype, Out=dtype, Part="fp32", Lse="fp32", Count="i32", Lens="i32")
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, SPLITS=splits, HAS_LENS=has_lens,
                      CAUSAL=True, DOT_PRECISION="tf32")
    if not has_lens:
        constexprs["Lens"] = None
    label = f"{dtype} d{head_dim} {block_m}x{block_n} splits{splits} w{NUM_WARPS} s{NUM_STAGES}"
    return Case("decode", label, _decode_split, pointers, constexprs, ("sm_scale",),
                dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES))


def decode_cases() -> Iterator[Case]:
    from ._decode_kernel import block_sizes

    for d in (64, 128):
        for rows in (1, 8, 64):  # q heads per kv head x queries
            yield decode_case("fp16", d, *block_sizes(d, rows, interpret=False))


def depthwise_case() -> Case:
    from ._conv_kernel import _conv_depthwise

    pointers = dict(X="bf16", W="bf16", Bias="bf16", Mean="fp32", Var="fp32", Gamma="fp32", Beta="fp32",
                    Out="bf16")
    constexprs = dict(KH=3, KW=3, ACT="relu", HAS_BIAS=True, HAS_BN=True, HAS_AFFINE=True, BLOCK_C=4,
                      BLOCK_P=256)  # what _depthwise_blocks picks for a large image
    return Case("depthwise", "bf16 3x3 4x256 w4", _conv_depthwise, pointers, constexprs, ("eps",),
                dict(num_warps=4))
