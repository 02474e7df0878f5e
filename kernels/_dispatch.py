"""Where a kernel call runs (compiled Triton, Triton's interpreter, or the torch reference), and how
kernels are built.

The switch is read at *call* time, never at import:

- CUDA tensors run the compiled Triton kernel (or the interpreter when ``TRITON_INTERPRET=1``, which
  is Triton's own debugging convention);
- CPU tensors run the torch reference, unless ``GENIE_TRITON_INTERPRET=1`` or ``TRITON_INTERPRET=1``
  asks for the Triton kernel in the interpreter;
- any other device (meta, ...) runs the reference.

Kernels are written as plain functions and wrapped here, per mode, on first use:
``InterpretedFunction`` for the interpreter, ``JITFunction`` for the GPU. ``@triton.jit`` would pick
the mode from the environment once, when the module is imported; building on demand makes the result
independent of import order and keeps ``import genie.kernels`` free of triton. The price is that a
kernel cannot call another jitted helper through a module global, so each kernel is self-contained
(and ``_tl`` explains how they avoid triton's own jitted helpers such as ``tl.max``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

Backend = Literal["triton", "interpret", "reference"]

INTERPRET_ENV_VARS = ("GENIE_TRITON_INTERPRET", "TRITON_INTERPRET")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRUE = {"1", "true", "yes", "on"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def interpreter_requested() -> bool:
    """True when the environment asks CPU calls to run the Triton kernels in the interpreter."""
    return any(_env_flag(name) for name in INTERPRET_ENV_VARS)


def backend_for(device: torch.device) -> Backend:
    """The backend a public kernel function uses for tensors on ``device``."""
    if device.type == "cuda":
        return "interpret" if _env_flag("TRITON_INTERPRET") else "triton"
    if device.type == "cpu" and interpreter_requested():
        return "interpret"
    return "reference"


def interpreted(device: torch.device) -> bool:
    """Whether a Triton launch on ``device`` must go through the interpreter."""
    return device.type != "cuda" or _env_flag("TRITON_INTERPRET")


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device``'s GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def build(fn: Callable[..., None], interpret: bool) -> Any:
    """Wrap the plain kernel function ``fn`` for the interpreter or for compilation (cached)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# --- argument checks shared by the launchers and references --------------------------------------


def check_tensor(op: str, name: str, t: object, ndim: int,
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected one of {allowed}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_like(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` must share ``ref``'s dtype and device."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_scale(op: str, scale: object) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{op}: scale must be a Python float or None, got {type(scale).__name__}")


def check_launchable(op: str, device: torch.device) -> None:
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"{op}: the Triton kernel runs on CUDA (or on CPU, interpreted), not on {device}; "
                         f"use {op}_reference")


def check_no_grad(op: str, tensors: dict[str, torch.Tensor | None]) -> None:
    """The Triton kernels are forward-only: refuse rather than return a result with no gradient."""
    if not torch.is_grad_enabled():
        return
    needing = [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if needing:
        raise NotImplementedError(
            f"{op}: the Triton kernel has no backward pass, but {', '.join(needing)} require grad; run it "
            f"under torch.no_grad() / torch.inference_mode(), or use {op}_reference for training")


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """Kernels need the innermost dimension contiguous for vector loads; other strides are passed
    through as they are. This is the one documented copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()
