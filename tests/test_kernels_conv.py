"""genie.kernels.conv2d_bn_act against F.relu(bn(conv(x))) with the BatchNorm in eval mode.

On CPU the Triton kernels run in Triton's interpreter (GENIE_TRITON_INTERPRET=1, set by the module
fixture and read at call time); with a GPU the same tests also run compiled on CUDA. Blocks are 32
wide and shapes small.

Tolerances, against the unfused computation in fp32 on the same (upcast) inputs and weights:
- fp32: 1e-4 abs and rel (exact fp32 dot in the interpreter); 1e-2 on a GPU, where fp32 convs
  always run on TF32 tensor cores (cuDNN's default too).
- fp16: 5e-3 abs and rel: fp32 accumulation, one rounding of the output (2^-11 relative).
- bf16: 3e-2 abs and rel. The implicit-GEMM kernel uses tl.dot, which the Triton 3.9 interpreter
  gets wrong for bf16, so bf16 GEMM numerics are GPU only; the depthwise kernel (no dot) is checked
  in bf16 on CPU too.
"""

from __future__ import annotations

import genie.kernels as K
import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICES as DEVICES
from conftest import skip_bf16_dot_on_cpu
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, None: lambda y: y}
pytestmark = pytest.mark.usefixtures("triton_interpreter", "seeded")


def make_bn(channels: int, device: str = "cpu", affine: bool = True) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm with non-trivial statistics, frozen as for inference (the kernels are
    forward-only, see test_grad_is_refused)."""
    bn = nn.BatchNorm2d(channels, affine=affine).to(device).eval().requires_grad_(False)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    return bn


def unfused(x, w, b, bn, activation, stride, padding, dilation, groups=1):
    """The unfused computation the issue asks to match: act(bn(conv(x))), eval mode, in fp32."""
    y = F.conv2d(x.float(), w.float(), None if b is None else b.float(), stride, padding, dilation, groups)
    if bn is not None:
        y = bn.float()(y)
    return ACT[activation](y)


def assert_close(actual, want, dtype):
    assert actual.dtype == dtype
    tol = TOL[dtype]
    if actual.is_cuda and dtype == torch.float32:
        tol = 1e-2  # fp32 convs run on TF32 tensor cores on a GPU
    torch.testing.assert_close(actual.float(), want, atol=tol, rtol=tol)


CASES = [  # (N, C, H, W, C_out, kernel, stride, padding, dilation)
    pytest.param(2, 3, 9, 11, 8, 3, 1, 1, 1, id="3x3-same-odd"),
    pytest.param(1, 5, 13, 7, 40, 3, 2, 1, 1, id="3x3-s2"),
    pytest.param(1, 8, 10, 10, 16, 1, 1, 0, 1, id="1x1"),
    pytest.param(1, 8, 9, 9, 16, 1, 2, 0, 1, id="1x1-s2-downsample"),
    pytest.param(1, 6, 12, 12, 6, 5, 2, 3, 2, id="5x5-s2-p3-d2"),
    pytest.param(1, 3, 15, 15, 8, 7, 2, 3, 1, id="7x7-stem"),
    pytest.param(1, 40, 7, 5, 33, 3, 1, 2, 2, id="c40-d2-p2"),
    pytest.param(2, 4, 6, 9, 5, (3, 1), (1, 2), (1, 0), (2, 1), id="rect-pairs"),
    pytest.param(1, 3, 8, 10, 4, (1, 3), (2, 1), (0, 2), (1, 2), id="rect-pairs-w"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, c, h, w, c_out, ks, stride, padding, dilation", CASES)
def test_conv_bn_relu_matches_unfused(n, c, h, w, c_out, ks, stride, padding, dilation, dtype, device):
    skip_bf16_dot_on_cpu(dtype, device)
    kh, kw = (ks, ks) if isinstance(ks, int) else ks
    x = torch.randn(n, c, h, w, dtype=dtype, device=device)
    weight = (torch.randn(c_out, c, kh, kw, device=device) / (c * kh * kw) ** 0.5).to(dtype)
    bias = torch.randn(c_out, dtype=dtype, device=device)
    bn = make_bn(c_out, device)
    out = K.conv2d_bn_act(x, weight, bias, bn=bn, stride=stride, padding=padding, dilation=dilation)
    want = unfused(x, weight, bias, bn, "relu", stride, padding, dilation)
    assert out.shape == want.shape and out.is_contiguous()
    assert_close(out, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", None, "none"])
@pytest.mark.parametrize("with_bn", [True, False])
def test_activations(activation, with_bn, device):
    x = torch.randn(1, 6, 9, 8, device=device) * 2
    weight = torch.randn(12, 6, 3, 3, device=device) * 0.2
    bn = make_bn(12, device) if with_bn else None
    out = K.conv2d_bn_act(x, weight, bn=bn, activation=activation, padding=1)
    want = unfused(x, weight, None, bn, None if activation == "none" else activation, 1, 1, 1)
    assert_close(out, want, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_tuple_and_no_affine(device):
    x = torch.randn(1, 4, 8, 8, device=device)
    weight = torch.randn(8, 4, 3, 3, device=device) * 0.2
    bn = make_bn(8, device, affine=False)
    as_tuple = (bn.running_mean, bn.running_var, None, None, bn.eps)
    want = unfused(x, weight, None, bn, "silu", 1, 1, 1)
    assert_close(K.conv2d_bn_act(x, weight, bn=bn, activation="silu", padding=1), want, torch.float32)
    assert_close(K.conv2d_bn_act(x, weight, bn=as_tuple, activation="silu", padding=1), want, torch.float32)
    gamma = torch.rand(8, device=device) + 0.5  # one-sided affine: beta missing means 0
    half_affine = (bn.running_mean, bn.running_var, gamma, None, 1e-3)
    ref = K.conv2d_bn_act_reference(x, weight, bn=half_affine, padding=1)
    assert_close(K.conv2d_bn_act(x, weight, bn=half_affine, padding=1), ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("multiplier, ks, stride, padding, dilation", [
    (1, 3, 1, 1, 1), (1, 3, 2, 1, 1), (2, 5, 1, 2, 1), (1, 3, 1, 2, 2), (3, 1, 2, 0, 1),
])
def test_depthwise(multiplier, ks, stride, padding, dilation, dtype, device):
    c = 6
    x = torch.randn(2, c, 11, 9, dtype=dtype, device=device)
    weight = (torch.randn(c * multiplier, 1, ks, ks, device=device) * 0.3).to(dtype)
    bias = torch.randn(c * multiplier, dtype=dtype, device=device)
    bn = make_bn(c * multiplier, device)
    out = K.conv2d_bn_act(x, weight, bias, bn=bn, activation="relu", stride=stride, padding=padding,
                          dilation=dilation, groups=c)
    assert_close(out, unfused(x, weight, bias, bn, "relu", stride, padding, dilation, groups=c), dtype)


def test_grad_is_refused():
    """No backward pass: inputs that need grad are refused by the kernel, fine under no_grad, and the
    reference (plain torch ops) stays differentiable."""
    x, weight = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3, requires_grad=True)
    bn = nn.BatchNorm2d(4).eval()  # affine parameters require grad
    with pytest.raises(NotImplementedError, match="no backward pass, but weight require grad"):
        K.conv2d_bn_act(x, weight)
    with pytest.raises(NotImplementedError, match="bn weight, bn bias require grad"):
        K.conv2d_bn_act(x, weight.detach(), bn=bn)
    with torch.no_grad():
        K.conv2d_bn_act(x, weight, bn=bn)
    K.conv2d_bn_act_reference(x, weight, bn=bn).sum().backward()
    assert weight.grad is not None


def test_fold_batchnorm():
    weight, bias = torch.randn(8, 4, 3, 3), torch.randn(8)
    bn = make_bn(8)
    x = torch.randn(2, 4, 7, 7)
    w2, b2 = K.fold_batchnorm(weight, bias, bn)
    torch.testing.assert_close(F.conv2d(x, w2, b2, padding=1), bn(F.conv2d(x, weight, bias, padding=1)),
                               atol=1e-5, rtol=1e-5)
    w3, b3 = K.fold_batchnorm(weight, None, bn)
    torch.testing.assert_close(F.conv2d(x, w3, b3), bn(F.conv2d(x, weight)), atol=1e-5, rtol=1e-5)
    # A folded conv then runs without bn and gives the fused answer.
    fused = K.conv2d_bn_act(x, weight, bias, bn=bn, padding=1)
    torch.testing.assert_close(K.conv2d_bn_act(x, w2, b2, padding=1), fused, atol=1e-4, rtol=1e-4)
    wh, bh = K.fold_batchnorm(weight.half(), bias.half(), bn)
    assert wh.dtype == bh.dtype == torch.float16


def test_reference_matches_unfused():
    x, weight, bias = torch.randn(2, 5, 10, 9), torch.randn(7, 5, 3, 3) * 0.3, torch.randn(7)
    bn = make_bn(7)
    ref = K.conv2d_bn_act_reference(x, weight, bias, bn=bn, activation="gelu", stride=2, padding=1)
    torch.testing.assert_close(ref, unfused(x, weight, bias, bn, "gelu", 2, 1, 1))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(1, 2), c=st.integers(1, 9), c_out=st.integers(1, 40), h=st.integers(1, 12),
       w=st.integers(1, 12), ks=st.sampled_from([1, 2, 3]), stride=st.integers(1, 2),
       padding=st.integers(0, 2), dilation=st.integers(1, 2), depthwise=st.booleans(),
       activation=st.sampled_from(list(ACT)), dtype=st.sampled_from([torch.float32, torch.float16]),
       with_bias=st.booleans(), with_bn=st.booleans())
def test_conv_hypothesis(n, c, c_out, h, w, ks, stride, padding, dilation, depthwise, activation, dtype,
                         with_bias, with_bn):
    span = dilation * (ks - 1) + 1
    assume(h + 2 * padding >= span and w + 2 * padding >= span)
    if depthwise:
        c_out = c * (1 + c_out % 3)
    x = torch.randn(n, c, h, w, dtype=dtype)
    weight = (torch.randn(c_out, 1 if depthwise else c, ks, ks) * 0.3).to(dtype)
    bias = torch.randn(c_out, dtype=dtype) if with_bias else None
    bn = make_bn(c_out) if with_bn else None
    groups = c if depthwise else 1
    out = K.conv2d_bn_act(x, weight, bias, bn=bn, activation=activation, stride=stride, padding=padding,
                          dilation=dilation, groups=groups)
    assert_close(out, unfused(x, weight, bias, bn, activation, stride, padding, dilation, groups), dtype)


# --- layouts and errors ----------------------------------------------------------------------------


def test_strided_inputs_are_read_in_place():
    """Sliced views and non-contiguous weights need no copy: the kernel takes all four strides. The
    output follows x's layout, as F.conv2d's does: channels-last in, channels-last out."""
    bn = make_bn(8)
    weight = torch.randn(8, 6, 3, 3) * 0.2
    x_cl = torch.randn(2, 6, 9, 10).to(memory_format=torch.channels_last)
    x_sliced = torch.randn(2, 12, 9, 20)[:, ::2, :, ::2]
    w_t = torch.randn(6, 8, 3, 3).transpose(0, 1) * 0.2  # a non-contiguous weight
    for x, wt in ((x_cl, weight), (x_sliced, weight), (torch.randn(1, 6, 7, 7), w_t)):
        assert not (x.is_contiguous() and wt.is_contiguous())
        out = K.conv2d_bn_act(x, wt, bn=bn, padding=1)
        ref = K.conv2d_bn_act_reference(x, wt, bn=bn, padding=1)
        assert out.is_contiguous(memory_format=torch.channels_last if x is x_cl else torch.contiguous_format)
        assert out.stride() == ref.stride()
        assert_close(out, unfused(x, wt, None, bn, "relu", 1, 1, 1), torch.float32)


CHANNELS_LAST = [  # (N, C, H, W, C_out, kernel, stride, padding): the three compiled paths
    pytest.param(2, 16, 5, 7, 24, 1, 1, 0, id="1x1-matmul"),
    pytest.param(1, 8, 9, 9, 16, 1, 2, 0, id="1x1-s2"),
    pytest.param(1, 8, 6, 6, 8, 1, 1, 1, id="1x1-padded"),
    pytest.param(2, 16, 8, 9, 40, 3, 1, 1, id="3x3"),
    pytest.param(1, 3, 15, 15, 8, 7, 2, 3, id="7x7-stem"),
]


@pytest.mark.parametrize("out_cl", [None, True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n, c, h, w, c_out, ks, stride, padding", CHANNELS_LAST)
def test_channels_last_end_to_end(n, c, h, w, c_out, ks, stride, padding, dtype, out_cl):
    """NHWC activations, a weight permuted once, and the output in the layout asked for."""
    x = torch.randn(n, c, h, w).to(dtype, memory_format=torch.channels_last)
    weight = (torch.randn(c_out, c, ks, ks) * 0.2).to(dtype)
    bias, bn = torch.randn(c_out).to(dtype), make_bn(c_out)
    out = K.conv2d_bn_act(x, weight, bias, bn=bn, stride=stride, padding=padding, channels_last=out_cl)
    fmt = torch.contiguous_format if out_cl is False else torch.channels_last
    assert out.is_contiguous(memory_format=fmt)
    assert_close(out, unfused(x, weight, bias, bn, "relu", stride, padding, 1), dtype)


@pytest.mark.parametrize("tma", [True, False])
def test_1x1_matmul_path_with_and_without_tma(tma):
    """The 1x1 stride-1 matmul path loads through tensor descriptors (interpreted here); ragged M, N
    and K edges come back zero-filled, not read from the neighbouring row."""
    from genie.kernels import _conv_kernel

    x = torch.randn(1, 48, 5, 7).to(memory_format=torch.channels_last)  # M = 35, K = 48: ragged
    weight = torch.randn(40, 48, 1, 1) * 0.2
    bn = make_bn(40)
    assert _conv_kernel._matmul_tma(x, weight.contiguous(memory_format=torch.channels_last), (1, 1), (0, 0))
    got = _conv_kernel.launch(x, weight, None, K._conv.batchnorm_params("t", bn, 40, x), "relu", (1, 1),
                              (0, 0), (1, 1), False, None, tma)
    assert_close(got, unfused(x, weight, None, bn, "relu", 1, 0, 1), torch.float32)


def test_weight_is_permuted_once_and_refreshed_on_write():
    from genie.kernels import _conv_kernel

    x = torch.randn(1, 8, 6, 6).to(memory_format=torch.channels_last)
    weight = torch.randn(16, 8, 3, 3) * 0.2
    first = _conv_kernel.weight_channels_last(weight)
    assert first.is_contiguous(memory_format=torch.channels_last)
    assert _conv_kernel.weight_channels_last(weight) is first  # cached: no per-call permute
    K.conv2d_bn_act(x, weight, padding=1)
    assert _conv_kernel.weight_channels_last(weight) is first
    with torch.no_grad():
        weight.mul_(2)  # written in place: the cached copy is stale
    second = _conv_kernel.weight_channels_last(weight)
    assert second is not first
    torch.testing.assert_close(second, weight)
    torch.testing.assert_close(K.conv2d_bn_act(x, weight, padding=1, activation=None),
                               F.conv2d(x, weight, padding=1), atol=1e-4, rtol=1e-4)


def test_nchw_input_still_works_and_stays_nchw():
    x, weight = torch.randn(1, 8, 6, 6), torch.randn(16, 8, 1, 1)
    out = K.conv2d_bn_act(x, weight, activation=None)
    assert out.is_contiguous()
    torch.testing.assert_close(out, F.conv2d(x, weight), atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="channels_last must be a bool or None"):
        K.conv2d_bn_act(x, weight, channels_last="yes")


@pytest.mark.parametrize("fn", [K.conv2d_bn_act, K.conv2d_bn_act_reference,
                                K.FUSED_OPS["genie.conv2d_bn_act"].launcher],
                         ids=["public", "reference", "launcher"])
def test_conv_errors(fn):
    x, weight = torch.randn(1, 4, 8, 8), torch.randn(8, 4, 3, 3)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        fn(x.long(), weight)
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has torch.float32"):
        fn(x, weight.half())
    with pytest.raises(ValueError, match="x must be 4-D"):
        fn(x[0], weight)
    with pytest.raises(ValueError, match="weight has 3 input channels per group but x has 4"):
        fn(x, weight[:, :3])
    with pytest.raises(ValueError, match=r"bias has shape \(4,\); expected \(8,\)"):
        fn(x, weight, torch.randn(4))
    with pytest.raises(TypeError, match="bias has dtype torch.float16 but x has torch.float32"):
        fn(x, weight, torch.randn(8).half())
    with pytest.raises(ValueError, match="activation must be one of"):
        fn(x, weight, activation="tanh")
    with pytest.raises(NotImplementedError, match="groups=2 is not implemented"):
        fn(x, torch.randn(8, 2, 3, 3), groups=2)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        fn(x, weight, stride=0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        fn(x, weight, padding=(1, -1))
    with pytest.raises(TypeError, match="dilation must be an int or a pair"):
        fn(x, weight, dilation=(1, 2, 3))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        fn(x[:, :, :2], weight)
    train_bn = nn.BatchNorm2d(8)  # training mode by default
    with pytest.raises(ValueError, match="bn is in training mode"):
        fn(x, weight, bn=train_bn)
    with pytest.raises(ValueError, match=r"bn running_mean has shape \(4,\)"):
        fn(x, weight, bn=(torch.zeros(4), torch.ones(8), None, None, 1e-5))
    with pytest.raises(TypeError, match="bn must be an nn.BatchNorm2d or a tuple"):
        fn(x, weight, bn={"mean": torch.zeros(8)})
    with pytest.raises(TypeError, match="bn eps must be a non-negative float"):
        fn(x, weight, bn=(torch.zeros(8), torch.ones(8), None, None, None))


def test_fuse_pass_feeds_channels_last():
    """The scheduler's fused conv nodes ask for channels-last output and say so in their metadata;
    the plan still computes what the unfused graph does."""
    from test_semantic_workload import example, traced

    import genie
    from genie.server import Interpreter

    g = traced("conv_blocks")
    plan = genie.schedule(g)
    convs = [n for n in plan.graph.nodes if n.op == "genie.conv2d_bn_act"]
    assert convs
    for n in convs:
        assert n.kwargs["channels_last"] is True
        meta = n.outputs[0]
        assert torch.empty_strided(meta.shape, meta.stride).is_contiguous(memory_format=torch.channels_last)
    cpu = torch.device("cpu")
    inputs = list(example("conv_blocks"))
    want = Interpreter(g, device=cpu, constants=g.constants).run(inputs)
    got = Interpreter(plan.graph, device=cpu, constants=plan.graph.constants).run(inputs)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
