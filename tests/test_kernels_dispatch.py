"""How genie.kernels picks a backend, the fused-op table, and what importing it does (and does not)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import genie.kernels as K
import pytest
import torch
from genie.kernels import _attention, _conv, _decode
from genie.kernels._dispatch import backend_for

ENV = ("GENIE_TRITON_INTERPRET", "TRITON_INTERPRET")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_public_names():
    assert sorted(K.__all__) == sorted([
        "FUSED_OPS", "FusedOp", "attention", "attention_reference", "conv2d_bn_act",
        "conv2d_bn_act_reference", "decode_attention", "decode_attention_reference", "fold_batchnorm",
    ])


@pytest.mark.parametrize("name, value, cpu_backend", [
    (None, None, "reference"),
    ("GENIE_TRITON_INTERPRET", "1", "interpret"),
    ("TRITON_INTERPRET", "1", "interpret"),
    ("GENIE_TRITON_INTERPRET", "true", "interpret"),
    ("GENIE_TRITON_INTERPRET", "0", "reference"),
    ("GENIE_TRITON_INTERPRET", "", "reference"),
])
def test_backend_is_read_from_the_environment_at_call_time(clean_env, name, value, cpu_backend):
    if name:
        clean_env.setenv(name, value)
    assert backend_for(torch.device("cpu")) == cpu_backend
    assert backend_for(torch.device("meta")) == "reference"
    assert backend_for(torch.device("cuda", 0)) == ("interpret" if name == "TRITON_INTERPRET" else "triton")


class _KernelCalled(Exception):
    pass


def _forbid(*args, **kwargs):
    raise _KernelCalled


@pytest.mark.parametrize("module, attr, call", [
    (_attention, "attention_triton", lambda: K.attention(*(torch.randn(1, 2, 8, 16),) * 3)),
    (_decode, "decode_attention_triton",
     lambda: K.decode_attention(torch.randn(1, 2, 1, 16), *(torch.randn(1, 2, 8, 16),) * 2, 8)),
    (_conv, "conv2d_bn_act_triton",
     lambda: K.conv2d_bn_act(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3))),
])
def test_cpu_runs_reference_unless_asked(clean_env, module, attr, call):
    clean_env.setattr(module, attr, _forbid)
    assert isinstance(call(), torch.Tensor)  # reference: the kernel was not touched
    clean_env.setenv("GENIE_TRITON_INTERPRET", "1")
    with pytest.raises(_KernelCalled):
        call()


def test_fused_ops_table():
    assert set(K.FUSED_OPS) == {"genie.attention", "genie.decode_attention", "genie.conv2d_bn_act"}
    assert isinstance(K.FUSED_OPS, dict)
    for op in K.FUSED_OPS.values():
        assert isinstance(op, K.FusedOp)
        assert callable(op.launcher) and callable(op.reference)
    assert K.FUSED_OPS["genie.attention"].reference is K.attention_reference


def test_fused_op_launchers_run_the_kernel_on_cpu(clean_env):
    """The executor calls .launcher on CUDA only, but off CUDA it still runs (interpreted), with the
    public function's signature."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 9, 32), torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
    bn = (torch.randn(4), torch.rand(4) + 0.5, torch.randn(4), torch.randn(4), 1e-5)
    calls = [
        ("genie.attention", (q, k, v), dict(causal=True)),
        ("genie.decode_attention", (q[:, :, :2], k, v, 7), dict(scale=0.2)),
        ("genie.conv2d_bn_act", (x, w), dict(bn=bn, activation="gelu", padding=1)),
    ]
    for name, args, kwargs in calls:
        op = K.FUSED_OPS[name]
        torch.testing.assert_close(op.launcher(*args, **kwargs), op.reference(*args, **kwargs),
                                   atol=1e-4, rtol=1e-4)


def test_references_work_on_meta_tensors(clean_env):
    """Off CPU and CUDA the references run, so meta tensors give output shapes without compute."""
    meta = dict(device="meta")
    q, k = torch.empty(2, 8, 5, 64, **meta), torch.empty(2, 2, 7, 64, **meta)
    assert K.attention(q, k, k, causal=True).shape == (2, 8, 5, 64)
    assert K.decode_attention(q[:, :, :1], k, k, 3).shape == (2, 8, 1, 64)
    x, w = torch.empty(2, 3, 17, 17, **meta), torch.empty(16, 3, 3, 3, **meta)
    assert K.conv2d_bn_act(x, w, stride=2, padding=1).shape == (2, 16, 9, 9)


def test_launchers_refuse_other_devices():
    q = torch.empty(1, 2, 4, 32, device="meta")
    with pytest.raises(ValueError, match="runs on CUDA .* not on meta; use attention_reference"):
        K.FUSED_OPS["genie.attention"].launcher(q, q, q)


_IMPORT_ORDER_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import genie  # the parent package runs first; what it imports is not genie.kernels' doing
    triton_before = "triton" in sys.modules
    import genie.kernels as K
    assert triton_before or "triton" not in sys.modules, "import genie.kernels must not import triton"
    loaded = [m for m in sys.modules if m.startswith("genie.kernels") and m.endswith("_kernel")]
    assert not loaded, loaded
    import triton.language  # bound now, in whichever mode TRITON_INTERPRET says
    os.environ["GENIE_TRITON_INTERPRET"] = "1"  # asked for only after everything is imported
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 40, 32), torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    close(K.attention(q, k, v, causal=True), K.attention_reference(q, k, v, causal=True))
    close(K.decode_attention(q[:, :, :3], k, v, 33), K.decode_attention_reference(q[:, :, :3], k, v, 33))
    x, w = torch.randn(1, 3, 9, 9), torch.randn(5, 3, 3, 3)
    close(K.conv2d_bn_act(x, w, padding=1), K.conv2d_bn_act_reference(x, w, padding=1))
    print("ok")
""")


@pytest.mark.parametrize("triton_interpret", [None, "1"], ids=["compiled-mode-stdlib", "interpreted-stdlib"])
def test_import_is_lazy_and_order_independent(triton_interpret):
    """Run in a fresh interpreter: importing genie.kernels loads no triton and runs nothing, and the
    interpreter switch works whether triton.language was imported with TRITON_INTERPRET=1 or not."""
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env["OMP_NUM_THREADS"] = "1"
    if triton_interpret:
        env["TRITON_INTERPRET"] = triton_interpret
    done = subprocess.run([sys.executable, "-c", _IMPORT_ORDER_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")
