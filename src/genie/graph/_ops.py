"""Op names to OpOverloads, through a table built once from torch's own op registry.

A name from the wire is only ever a key into that table (``"aten.add.Tensor"``); it never reaches
``getattr``, so ``aten.__init__.__getattribute__`` and friends are simply unknown names. The table
holds every aten and prims overload the dispatcher knows, minus the ones that reach outside tensors:

- an argument of a type that is not tensor data (``Storage``, ``Stream``, script classes, dicts);
- a ``str`` argument, unless its name is in ``HARMLESS_STR_ARGS`` (an enum such as
  ``rounding_mode``, or message text): a string may name a file (``aten.from_file``);
- ``REFUSED_OPS``: process-global state (printing, the cuFFT plan cache, the autograd engine).

Genie's fused ops come from a table the caller gives (``genie.kernels.FUSED_OPS``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import cache

import torch

from genie._errors import UnsupportedOpError

ALLOWED_NAMESPACES = ("aten", "prims")

# str arguments whose value only selects behaviour inside the op; name -> why that is harmless.
HARMLESS_STR_ARGS: dict[str, str] = {
    "UPLO": "'L' or 'U', checked by the kernel",
    "activation": "an activation name from a fixed set (sparse/mixed-dtype linear)",
    "algorithm": "a tiling algorithm name from a fixed set",
    "api_name": "text of an error message",
    "approximate": "gelu's 'none' or 'tanh'",
    "assert_msg": "text of an error message",
    "driver": "a LAPACK driver name from a fixed set",
    "equation": "einsum subscripts, parsed by einsum",
    "indexing": "meshgrid's 'ij' or 'xy'",
    "interpolation": "quantile's interpolation name",
    "mode": "qr or pad mode name",
    "norm": "fft normalization name",
    "ord": "matrix norm name ('fro', 'nuc')",
    "p": "condition number norm name ('fro', 'nuc')",
    "pad_mode": "stft padding mode name",
    "padding": "conv 'same' or 'valid'",
    "padding_side": "pad_sequence's 'left' or 'right'",
    "reduce": "scatter/segment reduction name",
    "rounding_mode": "div's 'trunc' or 'floor'",
    "side": "searchsorted's 'left' or 'right'",
}

# Argument types that are not tensor data: a storage aliases arbitrary memory, a stream or a script
# object is process state. Matched as words in the schema's type string.
REFUSED_TYPES = re.compile(r"\b(Storage|Stream|Dict|__torch__\S*)")
_STR = re.compile(r"\bstr\b")

# Ops whose arguments pass the rules but which still act on the process; name -> why refused.
REFUSED_OPS: dict[str, str] = {
    "aten._print.default": "prints on the server",
    "aten._cufft_clear_plan_cache.default": "changes the process-wide cuFFT plan cache",
    "aten._cufft_set_plan_cache_max_size.default": "changes the process-wide cuFFT plan cache",
    "aten._cufft_get_plan_cache_max_size.default": "reads the process-wide cuFFT plan cache",
    "aten._cufft_get_plan_cache_size.default": "reads the process-wide cuFFT plan cache",
    "aten.get_gradients.default": "reads the process's distributed autograd contexts",
    "aten._backward.default": "runs the autograd engine, which writes .grad of shared tensors",
}


@cache
def op_name(func: torch._ops.OpOverload) -> str:
    return f"{func.namespace}.{func._schema.name.split('::', 1)[1]}.{func._overloadname}"


def refusal(op: torch._ops.OpOverload) -> str | None:
    """Why ``op`` may not run on a server, or None when it computes on tensors only."""
    why = REFUSED_OPS.get(op_name(op))
    if why is not None:
        return why
    for a in op._schema.arguments:
        t = str(a.type)
        m = REFUSED_TYPES.search(t)
        if m:
            return f"argument {a.name!r} is a {m.group(1)}, not tensor data"
        if _STR.search(t) and a.name not in HARMLESS_STR_ARGS:
            return f"argument {a.name!r} is a string that may name a file or global state"
    return None


@cache
def registry() -> dict[str, tuple[str, str, str]]:
    """Every aten/prims overload the dispatcher knows: ``"ns.packet.overload"`` -> its parts.

    Built once, from names torch itself registered (a few ms); OpOverloads are made on first use.
    """
    out: dict[str, tuple[str, str, str]] = {}
    for qualified in torch._C._dispatch_get_all_op_names():
        ns, _, rest = qualified.partition("::")
        if ns in ALLOWED_NAMESPACES:
            packet, _, overload = rest.partition(".")
            overload = overload or "default"
            out[f"{ns}.{packet}.{overload}"] = (ns, packet, overload)
    return out


_RESOLVED: dict[str, torch._ops.OpOverload] = {}


def overload(parts: tuple[str, str, str]) -> torch._ops.OpOverload:
    """The OpOverload of registry parts (names torch registered, never wire text)."""
    ns, packet, name = parts
    return getattr(getattr(getattr(torch.ops, ns), packet), name)


def _resolve_torch(name: str) -> torch._ops.OpOverload:
    op = _RESOLVED.get(name)
    if op is not None:
        return op
    parts = registry().get(name)
    if parts is None:
        raise UnsupportedOpError(name, "not an aten or prims op of this torch (only those, and genie "
                                       "fused ops, run remotely)")
    op = overload(parts)
    why = refusal(op)
    if why is not None:
        raise UnsupportedOpError(name, f"refused on a shared server: {why}")
    _RESOLVED[name] = op
    return op


def resolve_op(name: str, fused: Mapping[str, Callable] | None = None) -> Callable:
    if type(name) is not str:
        raise UnsupportedOpError(repr(name)[:80], "an op name must be a string")
    if name.startswith("genie."):
        if fused is not None and name in fused:
            return fused[name]
        raise UnsupportedOpError(name, "not a known genie fused op")
    return _resolve_torch(name)


def check_op(name: str) -> None:
    """Decode-time check: aten/prims names must resolve; ``genie.*`` names are left to the
    executor's fused table (resolved for the whole graph before its first node runs)."""
    if type(name) is not str:
        raise UnsupportedOpError(repr(name)[:80], "an op name must be a string")
    if name.startswith("genie."):
        if not name[6:].isidentifier():
            raise UnsupportedOpError(name, "not a known genie fused op")
        return
    _resolve_torch(name)
