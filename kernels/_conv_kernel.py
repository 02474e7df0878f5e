"""Conv2d + BatchNorm (eval) + activation: the Triton kernels, the autotune configs and ``keep()``
rule, and the launcher. Imported lazily, on the first Triton call (see ``_dispatch``).

``_conv_gemm`` is an implicit GEMM: output pixels (batch x h_out x w_out) are the M dimension,
output channels the N dimension, and (kernel tap, input channel) the reduction. Nothing is unfolded
in memory; each step gathers an input tile for one tap and a block of channels. Any strides work, but
channels-last (NHWC) input is the fast layout: a warp's loads are then contiguous along channels
(cp.async on Hopper), where NCHW puts neighbouring channels H*W apart. The launcher therefore
permutes weights to channels-last once per weight tensor and, by default, writes channels-last
output when the input is channels-last. Three compile-time paths:

- 1x1, stride 1, no padding, channels-last: a plain matmul of (pixels, c_in) by (c_out, c_in)^T,
  loaded through TMA descriptors when the strides allow (``MATMUL_TMA``);
- other 1x1 convs: no tap arithmetic, so the compiler still sees aligned channel runs;
- everything else: the general tap x channel loop.

``_conv_depthwise`` is a direct convolution for ``groups == in_channels``.

BatchNorm is applied in the epilogue as a per-channel scale and shift computed from the running
statistics in the kernel, so a call costs one launch and no weight rewrite; ``fold_batchnorm`` does
the same fold into the weights once, for callers that keep weights resident.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ._dispatch import build, device_guard, interpreted, next_power_of_2


def _conv_gemm(
    X, W, Bias, Mean, Var, Gamma, Beta, Out,  # pointers (Bias .. Beta may be None)
    eps, batch, c_in, h_in, w_in, c_out, h_out, w_out, m_bucket,  # sizes (m_bucket: autotune key)
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,  # geometry
    sxn, sxc, sxh, sxw,  # strides
    swo, swc, swh, sww,
    son, soc, soh, sow,
    x_layout, w_layout, o_layout,  # 1 where channels are innermost: autotune key only
    KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_AFFINE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MATMUL_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row tiles share each weight tile while it is in L2.
    n_pix = h_out * w_out
    m_total = batch * n_pix
    tiles_m = (m_total + BLOCK_M - 1) // BLOCK_M
    tiles_n = (c_out + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
    pid_n = (pid % (GROUP_M * tiles_n)) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < m_total
    n_ok = offs_n < c_out
    img = offs_m // n_pix
    oh = (offs_m % n_pix) // w_out
    ow = offs_m % w_out
    # Offsets in int64: one image of a large activation can pass 2^31 elements.
    x_rows = X + img.to(tl.int64) * sxn
    w_cols = W + offs_n.to(tl.int64) * swo
    c_steps = (c_in + BLOCK_K - 1) // BLOCK_K
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)

    if MATMUL_TMA:
        # 1x1, stride 1, no padding, NHWC input and (c_out, c_in) weights: a plain matmul. The TMA
        # unit zero-fills the ragged edges, so there is no mask.
        a_desc = tl.make_tensor_descriptor(X, [m_total, c_in], [sxw, 1], [BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(W, [c_out, c_in], [swo, 1], [BLOCK_N, BLOCK_K])
        for step in range(0, c_steps):
            a = a_desc.load([pid_m * BLOCK_M, step * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, step * BLOCK_K])
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    elif KH * KW == 1:
        # 1x1 (any stride/padding): no tap arithmetic, so channel runs stay visibly aligned.
        ih = oh * stride_h - pad_h
        iw = ow * stride_w - pad_w
        row_ok = m_ok & (ih >= 0) & (ih < h_in) & (iw >= 0) & (iw < w_in)
        a_rows = x_rows + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        for step in range(0, c_steps):
            c = step * BLOCK_K + offs_k
            c_ok = c < c_in
            a = tl.load(a_rows[:, None] + c[None, :].to(tl.int64) * sxc, mask=row_ok[:, None] & c_ok[None, :],
                        other=0.0)
            b = tl.load(w_cols[None, :] + c[:, None] * swc, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        # One flat loop over (tap, channel block) pipelines better than two nested loops.
        for step in range(0, KH * KW * c_steps):
            tap = step // c_steps
            c = (step % c_steps) * BLOCK_K + offs_k
            r = tap // KW
            s = tap % KW
            ih = ih0 + r * dil_h
            iw = iw0 + s * dil_w
            row_ok = m_ok & (ih >= 0) & (ih < h_in) & (iw >= 0) & (iw < w_in)
            c_ok = c < c_in
            a = tl.load(x_rows[:, None] + (ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None]
                        + c[None, :].to(tl.int64) * sxc, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w_cols[None, :] + c[:, None] * swc + r * swh + s * sww,
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # Epilogue: bias, BatchNorm(running stats) as scale/shift per output channel, activation.
    y = acc
    if HAS_BIAS:
        y += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BN:
        mean = tl.load(Mean + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        scale = tl.math.rsqrt(tl.load(Var + offs_n, mask=n_ok, other=1.0).to(tl.float32) + eps)
        shift = -mean * scale
        if HAS_AFFINE:
            gamma = tl.load(Gamma + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            scale *= gamma
            shift = shift * gamma + tl.load(Beta + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        y = y * scale[None, :] + shift[None, :]
    if ACT == "relu":
        y = tl.maximum(y, 0.0)
    elif ACT == "gelu":
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == "silu":
        y = y / (1.0 + tl.math.exp(-y))
    out_rows = Out + img.to(tl.int64) * son + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow
    tl.store(out_rows[:, None] + offs_n[None, :].to(tl.int64) * soc, y.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _conv_depthwise(
    X, W, Bias, Mean, Var, Gamma, Beta, Out,  # pointers (Bias .. Beta may be None)
    eps, c_out, h_in, w_in, h_out, w_out, multiplier,  # sizes (output channel k reads input k // multiplier)
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,  # geometry
    sxn, sxc, sxh, sxw,  # strides
    swo, swh, sww,
    son, soc, soh, sow,
    KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_AFFINE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    img = tl.program_id(2).to(tl.int64)
    p_ok = offs_p < h_out * w_out
    c_ok = offs_c < c_out
    oh = offs_p // w_out
    ow = offs_p % w_out
    x_chan = X + img * sxn + (offs_c // multiplier).to(tl.int64) * sxc
    acc = tl.full([BLOCK_C, BLOCK_P], 0.0, dtype=tl.float32)
    for tap in tl.static_range(KH * KW):
        r = tap // KW
        s = tap % KW
        ih = oh * stride_h - pad_h + r * dil_h
        iw = ow * stride_w - pad_w + s * dil_w
        ok = p_ok & (ih >= 0) & (ih < h_in) & (iw >= 0) & (iw < w_in)
        x = tl.load(x_chan[:, None] + (ih * sxh + iw * sxw)[None, :], mask=c_ok[:, None] & ok[None, :],
                    other=0.0)
        w = tl.load(W + offs_c * swo + r * swh + s * sww, mask=c_ok, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)[:, None]

    # Epilogue as in _conv_gemm, with channels on axis 0.
    y = acc
    if HAS_BIAS:
        y += tl.load(Bias + offs_c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_BN:
        mean = tl.load(Mean + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        scale = tl.math.rsqrt(tl.load(Var + offs_c, mask=c_ok, other=1.0).to(tl.float32) + eps)
        shift = -mean * scale
        if HAS_AFFINE:
            gamma = tl.load(Gamma + offs_c, mask=c_ok, other=0.0).to(tl.float32)
            scale *= gamma
            shift = shift * gamma + tl.load(Beta + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        y = y * scale[:, None] + shift[:, None]
    if ACT == "relu":
        y = tl.maximum(y, 0.0)
    elif ACT == "gelu":
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == "silu":
        y = y / (1.0 + tl.math.exp(-y))
    tl.store(Out + img * son + offs_c[:, None].to(tl.int64) * soc
             + (oh.to(tl.int64) * soh + ow.to(tl.int64) * sow)[None, :],
             y.to(Out.dtype.element_ty), mask=c_ok[:, None] & p_ok[None, :])


# --- configs ---------------------------------------------------------------------------------------

INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}
INTERPRET_DEPTHWISE = {"BLOCK_C": 16, "BLOCK_P": 32}

CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
        (64, 64, 64, 4, 4), (64, 64, 32, 4, 5), (64, 32, 32, 4, 5), (32, 64, 32, 4, 5), (64, 64, 16, 4, 4),
    ]
]

_SMEM_BYTES = 200 * 1024


def keep(config: triton.Config, *, m: int, c_in: int, c_out: int, elem_size: int,
         channels_last: bool = True) -> bool:
    """Whether an autotune config is worth timing for this conv (GEMM of m x c_out, reduction over
    channels per tap). Every config kept compiles for sm_90 without spills (bench/kernels_aot.py);
    256-row tiles spilled, so they are not in CONFIGS."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    if bn > max(64, next_power_of_2(c_out)) or bm > max(64, next_power_of_2(m)):
        return False  # tiles larger than the output only add masked work
    if bk > max(16, next_power_of_2(c_in)):
        return False  # e.g. a 3-channel stem: a wide K block would be mostly padding
    if bk == 16 and c_in >= 32:
        return False
    if not channels_last and (bm * bn > 64 * 64 or bk > 32):
        return False  # NCHW gathers one element per channel per thread: larger tiles spill
    return config.num_stages * (bm + bn) * bk * elem_size <= _SMEM_BYTES


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    shape = dict(m=named_args["batch"] * named_args["h_out"] * named_args["w_out"],
                 c_in=named_args["c_in"], c_out=named_args["c_out"], elem_size=named_args["X"].element_size(),
                 channels_last=bool(named_args["x_layout"]))
    kept = [c for c in configs if keep(c, **shape)]
    smallest = min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]))
    return kept or [smallest]


@functools.cache
def _autotuned():
    # The key holds everything that changes the best tile: the layouts (NCHW and NHWC want different
    # ones), padding and dilation as well as sizes and stride.
    return triton.autotune(
        configs=CONFIGS, key=["c_in", "c_out", "m_bucket", "KH", "KW", "stride_h", "stride_w", "pad_h",
                              "pad_w", "dil_h", "dil_w", "x_layout", "w_layout", "o_layout", "ACT",
                              "MATMUL_TMA", "DOT_PRECISION"],
        prune_configs_by={"early_config_prune": _prune},
    )(build(_conv_gemm, False))


def dot_precision(dtype: torch.dtype) -> str:
    """Always "tf32", as for attention (``_attention_kernel.dot_precision``): cuDNN's own default for
    fp32 convs, and "ieee" spills on Hopper."""
    return "tf32"


def channels_last(t: torch.Tensor) -> bool:
    """Channels innermost (NHWC in memory): the kernel's fast layout."""
    return t.shape[1] == 1 or t.stride(1) == 1


def weight_channels_last(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as (out, kh, kw, in) in memory, permuted once per weight tensor and kept on it
    (re-made if the weight is written in place). A server's resident weights pay this once."""
    if channels_last(weight):
        return weight
    cached = getattr(weight, "_genie_channels_last", None)
    if cached is not None and cached[0] == weight._version:
        return cached[1]
    permuted = weight.contiguous(memory_format=torch.channels_last)
    with contextlib.suppress(AttributeError, RuntimeError):  # a subclass refusing attributes: no cache
        weight._genie_channels_last = (weight._version, permuted)
    return permuted


def _matmul_tma(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                padding: tuple[int, int]) -> bool:
    """A 1x1, stride-1, unpadded conv of dense NHWC input is a matmul TMA can load: 16-byte aligned
    bases and row strides."""
    if weight.shape[2:] != (1, 1) or stride != (1, 1) or padding != (0, 0):
        return False
    if not x.is_contiguous(memory_format=torch.channels_last) or weight.stride(1) != 1:
        return False
    size = x.element_size()
    aligned = all(p % 16 == 0 for p in (x.data_ptr(), weight.data_ptr(), x.shape[1] * size,
                                         weight.stride(0) * size))
    if x.device.type == "cuda":
        from ._attention_kernel import _capability

        aligned = aligned and _capability(x.device.index)[0] >= 9
    return aligned


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, float] | None,
           activation: str, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
           depthwise: bool, out_channels_last: bool | None = None,
           matmul_tma: bool | None = None) -> torch.Tensor:
    """Run the kernel on checked inputs (any strides); ``bn`` is (mean, var, gamma, beta, eps).
    ``out_channels_last`` None follows x's layout; ``matmul_tma`` overrides the TMA rule (tests)."""
    batch, c_in, h_in, w_in = x.shape
    c_out, _, kh, kw = weight.shape
    h_out = (h_in + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w_in + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if out_channels_last is None:
        out_channels_last = channels_last(x) and not x.is_contiguous()
    fmt = torch.channels_last if out_channels_last else torch.contiguous_format
    out = torch.empty((batch, c_out, h_out, w_out), dtype=x.dtype, device=x.device, memory_format=fmt)
    if out.numel() == 0:
        return out
    if not depthwise and channels_last(x):
        weight = weight_channels_last(weight)
    mean, var, gamma, beta, eps = bn if bn is not None else (None, None, None, None, 0.0)
    interpret = interpreted(x.device)
    flags = dict(KH=kh, KW=kw, ACT=activation, HAS_BIAS=bias is not None, HAS_BN=bn is not None,
                 HAS_AFFINE=gamma is not None)
    opts = {} if interpret else dict(enable_fp_fusion=True)
    geometry = (*stride, *padding, *dilation)
    with device_guard(x.device):
        if depthwise:
            sizes = dict(INTERPRET_DEPTHWISE) if interpret else _depthwise_blocks(h_out * w_out)
            grid = (triton.cdiv(h_out * w_out, sizes["BLOCK_P"]), triton.cdiv(c_out, sizes["BLOCK_C"]), batch)
            build(_conv_depthwise, interpret)[grid](
                x, weight, bias, mean, var, gamma, beta, out,
                float(eps), c_out, h_in, w_in, h_out, w_out, c_out // c_in, *geometry,
                *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *out.stride(),
                **flags, **sizes, **opts,
            )
            return out
        m = batch * h_out * w_out
        if matmul_tma is None:
            matmul_tma = _matmul_tma(x, weight, stride, padding)
        layouts = (int(channels_last(x)), int(channels_last(weight)), int(out_channels_last))
        args = (
            x, weight, bias, mean, var, gamma, beta, out,
            float(eps), batch, c_in, h_in, w_in, c_out, h_out, w_out, max(16, next_power_of_2(m)), *geometry,
            *x.stride(), *weight.stride(), *out.stride(), *layouts,
        )
        flags.update(DOT_PRECISION=dot_precision(x.dtype), MATMUL_TMA=bool(matmul_tma))
        if interpret:
            cfg = INTERPRET_CONFIG
            grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(c_out, cfg["BLOCK_N"]),)
            build(_conv_gemm, True)[grid](*args, **flags, **INTERPRET_CONFIG)
        else:
            if matmul_tma:
                from ._attention_kernel import _ensure_allocator

                _ensure_allocator()
            grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(c_out, META["BLOCK_N"]),)
            _autotuned()[grid](*args, **flags, **opts)
    return out


def _depthwise_blocks(n_pix: int) -> dict[str, int]:
    # Memory-bound: a wide, coalesced run of pixels per channel, a few channels per program. 1024
    # outputs per 4 warps: 2048 spilled on sm_90 (bench/kernels_aot.py).
    block_p = min(256, max(16, next_power_of_2(n_pix)))
    return dict(BLOCK_P=block_p, BLOCK_C=max(1, 1024 // block_p), num_warps=4)
