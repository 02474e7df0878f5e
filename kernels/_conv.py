"""Conv2d + BatchNorm (eval) + activation: the public entry point, its Triton launcher, its torch
reference, and ``fold_batchnorm``. The kernels are in ``_conv_kernel`` (implicit GEMM, plus a direct
depthwise kernel).

- Layout: ``x`` and ``weight`` may have any strides; x is read in place, never copied. Channels-last
  (NHWC) input is the fast layout; for it the weight is permuted to channels-last once per weight
  tensor (cached on it), and NCHW input still works, at the slower gather. The output is a new
  tensor of x's dtype, channels-last when ``channels_last=True``, contiguous NCHW when False, and
  by default in x's layout (channels-last exactly when x is channels-last and not also contiguous,
  as ``F.conv2d`` does).
- ``bias``: None or a (out_channels,) tensor of x's dtype, as for ``F.conv2d``.
- ``bn``: None, an ``nn.BatchNorm2d`` in eval mode, or a tuple
  ``(running_mean, running_var, weight, bias, eps)`` where weight and bias may be None (affine off).
  The statistics may be of any float dtype (fp32 BatchNorm in an fp16 model is common). Only running
  statistics are used: a BatchNorm module in training mode is an error, not a silent mismatch.
- ``activation``: "relu", "gelu" (erf form, as ``F.gelu``), "silu", or None.
- ``stride``, ``padding``, ``dilation``: an int or an (h, w) pair.
- ``groups``: 1, or ``in_channels`` with a (out_channels, 1, kh, kw) weight (depthwise, any channel
  multiplier). Other group counts raise NotImplementedError.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._dispatch import FLOAT_DTYPES, backend_for, check_launchable, check_like, check_no_grad, check_tensor

ACTIVATIONS = ("relu", "gelu", "silu", None)

BatchNormParams = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]
BatchNormArg = nn.BatchNorm2d | tuple  # the tuple form is BatchNormParams

_OP = "conv2d_bn_act"


class _Conv(NamedTuple):
    bn: BatchNormParams | None
    activation: str
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    depthwise: bool


def _pair(op: str, name: str, value: object, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def batchnorm_params(op: str, bn: object, channels: int, like: torch.Tensor,
                     like_name: str = "x") -> BatchNormParams:
    """Normalise ``bn`` (module or tuple) to (mean, var, gamma, beta, eps), checked against
    ``channels`` and ``like``'s device."""
    if isinstance(bn, nn.BatchNorm2d):
        if bn.training:
            raise ValueError(f"{op}: bn is in training mode; only running statistics (eval mode) can be "
                             "fused: call bn.eval()")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"{op}: bn has no running statistics (track_running_stats=False)")
        params = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    elif isinstance(bn, (tuple, list)) and len(bn) == 5:  # a list after the graph wire form
        params = bn
    else:
        raise TypeError(f"{op}: bn must be an nn.BatchNorm2d or a tuple (running_mean, running_var, "
                        f"weight, bias, eps), got {type(bn).__name__}")
    mean, var, gamma, beta, eps = params
    for name, t, optional in (("running_mean", mean, False), ("running_var", var, False),
                              ("weight", gamma, True), ("bias", beta, True)):
        if t is None and optional:
            continue
        check_tensor(op, f"bn {name}", t, 1)
        if t.shape != (channels,):
            raise ValueError(f"{op}: bn {name} has shape {tuple(t.shape)}; expected ({channels},)")
        if t.device != like.device:
            raise ValueError(f"{op}: bn {name} is on {t.device} but {like_name} is on {like.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise TypeError(f"{op}: bn eps must be a non-negative float, got {eps!r}")
    if (gamma is None) != (beta is None):  # one-sided affine: fill in the identity for the other
        gamma = torch.ones_like(mean) if gamma is None else gamma
        beta = torch.zeros_like(mean) if beta is None else beta
    return mean, var, gamma, beta, float(eps)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bn: object,
           activation: str | None, stride: object, padding: object, dilation: object,
           groups: int) -> _Conv:
    check_tensor(_OP, "x", x, 4)
    check_tensor(_OP, "weight", weight, 4)
    check_like(_OP, "weight", weight, "x", x)
    c_in, c_out = x.shape[1], weight.shape[0]
    if bias is not None:
        check_tensor(_OP, "bias", bias, 1, FLOAT_DTYPES)
        check_like(_OP, "bias", bias, "x", x)
        if bias.shape != (c_out,):
            raise ValueError(f"{_OP}: bias has shape {tuple(bias.shape)}; expected ({c_out},)")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise TypeError(f"{_OP}: groups must be a positive int, got {groups!r}")
    depthwise = groups > 1
    if depthwise and not (groups == c_in and weight.shape[1] == 1 and c_out % c_in == 0):
        raise NotImplementedError(f"{_OP}: groups={groups} is not implemented (only groups=1 and depthwise "
                                  f"groups=in_channels={c_in} with out_channels a multiple of it)")
    if weight.shape[1] * groups != c_in:
        raise ValueError(f"{_OP}: weight has {weight.shape[1]} input channels per group but x has {c_in} "
                         f"channels and groups={groups}")
    if activation == "none":
        activation = None
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    stride_ = _pair(_OP, "stride", stride, 1)
    padding_ = _pair(_OP, "padding", padding, 0)
    dilation_ = _pair(_OP, "dilation", dilation, 1)
    for axis, size, k in ((0, x.shape[2], weight.shape[2]), (1, x.shape[3], weight.shape[3])):
        span = dilation_[axis] * (k - 1) + 1
        if size + 2 * padding_[axis] < span:
            raise ValueError(f"{_OP}: x is {tuple(x.shape[2:])} spatially, smaller than the dilated kernel "
                             f"({span} along {'hw'[axis]}) even with padding {padding_}")
    params = None if bn is None else batchnorm_params(_OP, bn, c_out, x)
    return _Conv(params, activation or "none", stride_, padding_, dilation_, depthwise)


def conv2d_bn_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  bn: BatchNormArg | None = None, activation: str | None = "relu",
                  stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                  dilation: int | tuple[int, int] = 1, groups: int = 1,
                  channels_last: bool | None = None) -> torch.Tensor:
    """activation(bn(conv2d(x, weight, bias))), one kernel. Triton on CUDA; on CPU the torch reference,
    or the interpreter when ``GENIE_TRITON_INTERPRET=1``/``TRITON_INTERPRET=1``."""
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    run = conv2d_bn_act_reference if backend_for(device) == "reference" else conv2d_bn_act_triton
    return run(x, weight, bias, bn=bn, activation=activation, stride=stride, padding=padding,
               dilation=dilation, groups=groups, channels_last=channels_last)


def conv2d_bn_act_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                         bn: BatchNormArg | None = None, activation: str | None = "relu",
                         stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                         dilation: int | tuple[int, int] = 1, groups: int = 1,
                         channels_last: bool | None = None) -> torch.Tensor:
    """Always the Triton kernel: compiled on CUDA, interpreted elsewhere."""
    conv = _check(x, weight, bias, bn, activation, stride, padding, dilation, groups)
    bn_tensors = dict(zip(("bn running_mean", "bn running_var", "bn weight", "bn bias"), conv.bn or (),
                          strict=False))
    check_launchable(_OP, x.device)
    check_no_grad(_OP, dict(x=x, weight=weight, bias=bias, **bn_tensors))
    from . import _conv_kernel

    return _conv_kernel.launch(x, weight, bias, conv.bn, conv.activation, conv.stride, conv.padding,
                               conv.dilation, conv.depthwise, _out_channels_last(x, channels_last))


def conv2d_bn_act_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                            bn: BatchNormArg | None = None, activation: str | None = "relu",
                            stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                            dilation: int | tuple[int, int] = 1, groups: int = 1,
                            channels_last: bool | None = None) -> torch.Tensor:
    """The same computation with torch ops: conv2d, then eval-mode batch_norm and the activation in
    fp32 (as the kernel's epilogue does), rounded to x's dtype, in the kernel's output layout."""
    conv = _check(x, weight, bias, bn, activation, stride, padding, dilation, groups)
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups).float()
    if conv.bn is not None:
        mean, var, gamma, beta, eps = conv.bn
        y = F.batch_norm(y, mean.float(), var.float(), None if gamma is None else gamma.float(),
                         None if beta is None else beta.float(), training=False, eps=eps)
    if conv.activation == "relu":
        y = F.relu(y)
    elif conv.activation == "gelu":
        y = F.gelu(y)
    elif conv.activation == "silu":
        y = F.silu(y)
    fmt = torch.channels_last if _out_channels_last(x, channels_last) else torch.contiguous_format
    return y.to(x.dtype).contiguous(memory_format=fmt)


def _out_channels_last(x: torch.Tensor, channels_last: bool | None) -> bool:
    if channels_last is not None:
        if not isinstance(channels_last, bool):
            raise TypeError(f"{_OP}: channels_last must be a bool or None, got {channels_last!r}")
        return channels_last
    return (x.shape[1] == 1 or x.stride(1) == 1) and not x.is_contiguous()


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None,
                   bn: BatchNormArg) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode BatchNorm into a conv's weight and bias, once:
    ``bn(conv(x, w, b)) == conv(x, w', b')``. Computed in fp32, returned in weight's dtype."""
    check_tensor("fold_batchnorm", "weight", weight, 4)
    if bias is not None:
        check_tensor("fold_batchnorm", "bias", bias, 1)
    mean, var, gamma, beta, eps = batchnorm_params("fold_batchnorm", bn, weight.shape[0], weight, "weight")
    scale = torch.rsqrt(var.float() + eps)
    if gamma is not None:
        scale = scale * gamma.float()
    shift = -mean.float() * scale
    if bias is not None:
        shift = shift + bias.float() * scale
    if beta is not None:
        shift = shift + beta.float()
    return (weight.float() * scale[:, None, None, None]).to(weight.dtype), shift.to(weight.dtype)
