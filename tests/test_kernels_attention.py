"""genie.kernels.attention and decode_attention against torch's SDPA.

On CPU the Triton kernels run in Triton's interpreter: the module fixture sets
GENIE_TRITON_INTERPRET=1, which the public functions read at call time. (The kernels are built per
mode on first use and avoid triton's jitted stdlib helpers, so neither the import order nor
TRITON_INTERPRET at triton's import matters; test_kernels_dispatch.py checks both orders.) With a GPU
the same tests also run compiled on CUDA.

Shapes are small and blocks are 32 wide (about a millisecond per program instance interpreted).

Tolerances, against fp32 SDPA on the same (upcast) inputs:
- fp32: 1e-4 abs and rel in the interpreter, whose dot is exact fp32; 1e-2 on a GPU, where fp32
  attention always takes TF32 tensor cores (``_attention_kernel.dot_precision`` says why).
- fp16: 3e-3 abs and rel: inputs are fp16 already, so the error is the fp16 rounding of the
  probabilities before the P·V product (2^-11 relative) plus the output's rounding.
- bf16: 2e-2 abs and rel (8 mantissa bits instead of 11). GPU only: under the Triton 3.9
  interpreter tl.dot on bf16 operands returns garbage, so bf16 numerics are skipped on CPU.
"""

from __future__ import annotations

import math

import genie.kernels as K
import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICES as DEVICES
from conftest import skip_bf16_dot_on_cpu
from genie.kernels import _decode
from hypothesis import given, settings
from hypothesis import strategies as st

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
pytestmark = pytest.mark.usefixtures("triton_interpreter", "seeded")


def _qkv(b, h, h_kv, q_len, k_len, d, dtype, device="cpu"):
    q = torch.randn(b, h, q_len, d, dtype=dtype, device=device)
    k = torch.randn(b, h_kv, k_len, d, dtype=dtype, device=device)
    v = torch.randn(b, h_kv, k_len, d, dtype=dtype, device=device)
    return q, k, v


def expected(q, k, v, causal, scale=None, visible=None):
    """SDPA in fp32 with GQA expanded and bottom-right causal masking; rows that see no key are 0.
    ``visible``: an extra boolean mask broadcastable to (B, H, Lq, Lk)."""
    q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    q_len, k_len = q.shape[2], k.shape[2]
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device)
    if causal:
        mask = mask.tril(diagonal=k_len - q_len)
    if visible is not None:
        mask = mask & visible
    mask = mask.expand(q.shape[0], 1, q_len, k_len)
    if causal and visible is None and q_len == k_len:  # exactly SDPA's own causal convention
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros_like(out))


def assert_close(actual, want, dtype):
    assert actual.dtype == dtype
    assert not actual.isnan().any()
    tol = TOL[dtype]
    if actual.is_cuda and dtype == torch.float32:
        tol = 1e-2  # fp32 attention runs on TF32 tensor cores on a GPU (see dot_precision)
    torch.testing.assert_close(actual.float(), want.float(), atol=tol, rtol=tol)


# --- prefill ---------------------------------------------------------------------------------------

SHAPES = [  # (batch, heads, kv_heads, q_len, k_len, head_dim, causal)
    pytest.param(1, 2, 2, 64, 64, 32, False, id="square"),
    pytest.param(1, 2, 2, 64, 64, 32, True, id="square-causal"),
    pytest.param(2, 2, 2, 33, 33, 16, True, id="odd-causal"),
    pytest.param(1, 4, 2, 45, 45, 64, True, id="gqa-causal"),
    pytest.param(1, 4, 1, 19, 70, 32, False, id="mqa-rect"),
    pytest.param(1, 2, 1, 17, 50, 32, True, id="q<k-bottom-right"),
    pytest.param(1, 2, 2, 40, 23, 16, True, id="q>k-empty-rows"),
    pytest.param(1, 2, 2, 1, 37, 128, False, id="single-query-d128"),
    pytest.param(1, 1, 1, 5, 3, 32, False, id="shorter-than-block"),
    pytest.param(1, 2, 2, 20, 63, 32, False, id="k_len-one-short-of-blocks"),
    # k_len - q_len around the 32-wide key block: where the unmasked/masked split moves.
    *(pytest.param(1, 2, 1, 40, 40 + diag, 16, True, id=f"diag{diag}") for diag in (30, 31, 32, 33)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b, h, h_kv, q_len, k_len, d, causal", SHAPES)
def test_attention_matches_sdpa(b, h, h_kv, q_len, k_len, d, causal, dtype, device):
    skip_bf16_dot_on_cpu(dtype, device)
    q, k, v = _qkv(b, h, h_kv, q_len, k_len, d, dtype, device)
    out = K.attention(q, k, v, causal=causal)
    assert out.shape == q.shape and out.is_contiguous()
    assert_close(out, expected(q, k, v, causal), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_custom_scale(device):
    q, k, v = _qkv(1, 2, 2, 20, 40, 32, torch.float32, device)
    assert_close(K.attention(q, k, v, scale=0.3), expected(q, k, v, False, scale=0.3), torch.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_sdpa(causal):
    """The reference is what runs on CPU by default and on the server's non-CUDA path."""
    q, k, v = _qkv(2, 4, 2, 23, 31, 32, torch.float32)
    torch.testing.assert_close(K.attention_reference(q, k, v, causal=causal), expected(q, k, v, causal))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), h_kv=st.integers(1, 2), group=st.sampled_from([1, 2]),
       q_len=st.integers(1, 80), k_len=st.integers(1, 80), d=st.sampled_from([16, 32]),
       causal=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_attention_hypothesis(b, h_kv, group, q_len, k_len, d, causal, dtype):
    q, k, v = _qkv(b, h_kv * group, h_kv, q_len, k_len, d, dtype)
    assert_close(K.attention(q, k, v, causal=causal), expected(q, k, v, causal), dtype)


# --- decode ----------------------------------------------------------------------------------------

DECODE = [  # (batch, heads, kv_heads, q_len, capacity, cache_len, head_dim, causal)
    pytest.param(1, 2, 2, 1, 100, 77, 32, True, id="q1"),
    pytest.param(2, 4, 2, 3, 130, 100, 32, True, id="gqa-q3"),
    pytest.param(1, 8, 1, 16, 64, 40, 16, True, id="mqa-q16"),
    pytest.param(1, 4, 2, 5, 90, 90, 64, False, id="full-noncausal"),
    pytest.param(1, 2, 1, 4, 64, 2, 32, True, id="len<q_len"),
    pytest.param(1, 2, 1, 2, 64, 0, 32, True, id="empty"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b, h, h_kv, q_len, capacity, length, d, causal", DECODE)
def test_decode_matches_sdpa(b, h, h_kv, q_len, capacity, length, d, causal, dtype, device):
    skip_bf16_dot_on_cpu(dtype, device)
    q, k, v = _qkv(b, h, h_kv, q_len, capacity, d, dtype, device)
    out = K.decode_attention(q, k, v, length, causal=causal)
    want = expected(q, k[:, :, :length], v[:, :, :length], causal) if length else torch.zeros_like(q)
    assert_close(out, want, dtype)


@pytest.mark.parametrize("splits, capacity, length", [(1, 150, 131), (2, 150, 131), (3, 150, 131),
                                                      (7, 150, 131), (40, 1200, 1190)])
def test_decode_split_counts(splits, capacity, length):
    """Every way of cutting the cache into chunks gives the same answer, including empty chunks and
    more chunks than the reduce kernel combines in one step (32)."""
    from genie.kernels import _decode_kernel

    q, k, v = _qkv(1, 4, 2, 3, capacity, 16, torch.float32)
    k[:, :, length - 100:] *= 3  # the last chunks score highest: the combine must rescale what it has
    out = _decode_kernel.launch(q, k, v, length, True, 16 ** -0.5, splits)
    assert_close(out, expected(q, k[:, :, :length], v[:, :, :length], True), torch.float32)


def test_decode_heuristic_splits_long_cache():
    """Past MIN_SPLIT_KEYS the public path splits the key length and reduces."""
    from genie.kernels import _decode_kernel

    capacity = 2 * _decode_kernel.MIN_SPLIT_KEYS + 40
    assert _decode_kernel.num_splits(1, capacity, 32, n_sm=2) > 1
    q, k, v = _qkv(1, 2, 1, 2, capacity, 16, torch.float16)
    assert_close(K.decode_attention(q, k, v, capacity - 3), expected(q, k[:, :, :-3], v[:, :, :-3], True),
                 torch.float16)


@pytest.mark.parametrize("causal", [True, False])
def test_decode_per_sequence_lengths(causal):
    q, k, v = _qkv(3, 4, 2, 4, 96, 32, torch.float32)
    lens = torch.tensor([96, 41, 0])
    out = K.decode_attention(q, k, v, lens, causal=causal)
    keys, queries = torch.arange(96), torch.arange(4)[:, None]
    visible = keys < lens[:, None, None]  # (B, 1, S)
    if causal:
        visible = visible & (keys <= lens[:, None, None] - 4 + queries)
    assert_close(out, expected(q, k, v, False, visible=visible[:, None]), torch.float32)
    torch.testing.assert_close(K.decode_attention_reference(q, k, v, lens, causal=causal), out,
                               atol=1e-4, rtol=1e-4)


def test_decode_equals_prefill_tail():
    """Decoding the last q_len positions against the cache equals the tail rows of causal prefill."""
    q, k, v = _qkv(1, 4, 2, 50, 50, 32, torch.float32)
    full = K.attention(q, k, v, causal=True)
    tail = K.decode_attention(q[:, :, -6:], k, v, 50)
    torch.testing.assert_close(tail, full[:, :, -6:], atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), h_kv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       q_len=st.integers(1, 16), capacity=st.integers(1, 100), frac=st.floats(0, 1),
       d=st.sampled_from([16, 32]), splits=st.sampled_from([None, 1, 2, 3]), causal=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_decode_hypothesis(b, h_kv, group, q_len, capacity, frac, d, splits, causal, dtype):
    from genie.kernels import _decode_kernel

    length = round(frac * capacity)
    q, k, v = _qkv(b, h_kv * group, h_kv, q_len, capacity, d, dtype)
    out = _decode_kernel.launch(q, k, v, length, causal, 1 / math.sqrt(d), splits)
    want = expected(q, k[:, :, :length], v[:, :, :length], causal) if length else torch.zeros_like(q)
    assert_close(out, want, dtype)


@pytest.mark.parametrize("fn", [K.attention, K.attention_reference], ids=["kernel", "reference"])
def test_empty_inputs(fn):
    q, k, v = _qkv(1, 2, 2, 8, 0, 32, torch.float32)
    torch.testing.assert_close(fn(q, k, v, causal=True), torch.zeros_like(q))  # no keys: zeros
    q, k, v = _qkv(0, 2, 2, 8, 8, 32, torch.float32)
    assert fn(q, k, v).shape == q.shape


# --- layouts and errors ----------------------------------------------------------------------------

ENTRY_POINTS = [K.attention, K.attention_reference, K.FUSED_OPS["genie.attention"].launcher]


def test_strided_views_need_no_copy():
    """(B, L, H, D).transpose(1, 2) is read in place: only the innermost stride must be 1."""
    from genie.kernels._dispatch import unit_last_stride

    q, k, v = (torch.randn(1, 37, h, 32).transpose(1, 2) for h in (4, 2, 2))
    assert not q.is_contiguous() and unit_last_stride(q) is q
    assert_close(K.attention(q, k, v, causal=True), expected(q, k, v, True), torch.float32)


def test_non_unit_last_stride_is_copied():
    """A strided head_dim is the one case that is copied (documented), and still correct."""
    q, k, v = (torch.randn(1, 2, 20, 64)[..., ::2] for _ in range(3))
    assert q.stride(-1) == 2
    assert_close(K.attention(q, k, v), expected(q, k, v, False), torch.float32)
    assert_close(K.decode_attention(q[:, :, :2], k, v, 20), expected(q[:, :, :2], k, v, True), torch.float32)


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=["public", "reference", "launcher"])
def test_attention_errors(fn):
    q, k, v = _qkv(1, 4, 2, 8, 8, 32, torch.float32)
    with pytest.raises(TypeError, match="q has dtype torch.int64"):
        fn(q.long(), k, v)
    with pytest.raises(TypeError, match="k has dtype torch.float16 but q has torch.float32"):
        fn(q, k.half(), v)
    with pytest.raises(TypeError, match="float64"):
        fn(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        fn(q.numpy(), k, v)
    with pytest.raises(ValueError, match="q must be 4-D"):
        fn(q[0], k, v)
    with pytest.raises(ValueError, match="k has shape .* but v has"):
        fn(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="k has batch 2 but q has batch 1"):
        fn(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="k has head_dim 16"):
        fn(q, k[..., :16], v[..., :16])
    with pytest.raises(ValueError, match="not a multiple of k's 3 heads"):
        fn(q, k[:, :1].expand(-1, 3, -1, -1), v[:, :1].expand(-1, 3, -1, -1))
    with pytest.raises(NotImplementedError, match="head_dim=24 is not implemented"):
        fn(q[..., :24], k[..., :24], v[..., :24])
    with pytest.raises(TypeError, match="scale must be a Python float"):
        fn(q, k, v, scale=torch.tensor(0.1))


@pytest.mark.parametrize("fn", [K.decode_attention, K.decode_attention_reference,
                                K.FUSED_OPS["genie.decode_attention"].launcher],
                         ids=["public", "reference", "launcher"])
def test_decode_errors(fn):
    q, k, v = _qkv(2, 4, 2, 2, 40, 32, torch.float32)
    with pytest.raises(ValueError, match="q_len=17 is outside 1..16"):
        fn(torch.randn(2, 4, 17, 32), k, v, 20)
    with pytest.raises(TypeError, match="k_cache has dtype torch.float16"):
        fn(q, k.half(), v, 20)
    with pytest.raises(ValueError, match="k_cache has shape .* but v_cache has"):
        fn(q, k, v[:, :, :10], 20)
    with pytest.raises(ValueError, match=r"cache_len=41 is outside \[0, 40\]"):
        fn(q, k, v, 41)
    with pytest.raises(ValueError, match="cache_len=-1"):
        fn(q, k, v, -1)
    with pytest.raises(TypeError, match="cache_len must be an int or a tensor, got float"):
        fn(q, k, v, 20.0)
    with pytest.raises(TypeError, match="cache_len tensor has dtype torch.float32"):
        fn(q, k, v, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"cache_len tensor must have shape \(2,\)"):
        fn(q, k, v, torch.tensor([3]))


def test_grad_is_refused():
    q, k, v = _qkv(1, 2, 2, 8, 8, 32, torch.float32)
    with pytest.raises(NotImplementedError, match="attention: the Triton kernel has no backward pass"):
        K.attention(q.requires_grad_(), k, v)
    with pytest.raises(NotImplementedError, match="k_cache, v_cache require grad"):
        K.decode_attention(q[:, :, :1].detach(), k.requires_grad_(), v.requires_grad_(), 8)
    with torch.inference_mode():
        K.attention(q, k, v)
    K.attention_reference(q, k, v).sum().backward()
    assert q.grad is not None


def test_decode_accepts_numpy_int():
    import numpy as np

    q, k, v = _qkv(1, 2, 2, 1, 40, 32, torch.float32)
    torch.testing.assert_close(_decode.decode_attention(q, k, v, np.int64(20)),
                               K.decode_attention(q, k, v, 20))


# --- int64 offsets ---------------------------------------------------------------------------------

_HUGE_ROWS = '''
import os, sys, torch
os.environ["GENIE_TRITON_INTERPRET"] = "1"
import genie.kernels as K
torch.manual_seed(0)
d, stride = 16, 2**30 + 16  # row 2 sits at element 2^31 + 32: past int32
# Untouched pages of an empty tensor are never backed, so 4 GiB of address space costs 3 pages.
big = torch.empty(2 * stride + d, dtype=torch.float16)
rows = big.as_strided((1, 1, 3, d), (0, 0, stride, 1))
rows.copy_(torch.randn(1, 1, 3, d, dtype=torch.float16))
small = rows.clone()
k, v = torch.randn(1, 1, 3, d, dtype=torch.float16), torch.randn(1, 1, 3, d, dtype=torch.float16)
kind = sys.argv[1]
if kind == "attention_q":
    got, want = K.attention(rows, k, v), K.attention(small, k, v)
elif kind == "attention_kv":
    got, want = K.attention(k, rows, rows, causal=True), K.attention(k, small, small, causal=True)
else:
    got = K.decode_attention(k[:, :, :1], rows, rows, 3)
    want = K.decode_attention(k[:, :, :1], small, small, 3)
torch.testing.assert_close(got, want, atol=0, rtol=0)
print("ok")
'''


@pytest.mark.parametrize("kind", ["attention_q", "attention_kv", "decode_kv"])
def test_offsets_past_int32(kind):
    """A (B, L, H, D)-style view whose row offset passes 2^31 elements reads the right rows: offsets
    are int64. Run in a child process: an int32 wrap would read unmapped memory and could crash."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _HUGE_ROWS, kind], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
