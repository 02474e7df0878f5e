"""Op names to OpOverloads, through a table built once from torch's own op registry.

A name from the wire is only ever a key into that table (``"aten.add.Tensor"``); it never reaches
``getattr``, so ``aten.__init__.__getattribute__`` and friends are simply unknown names. The table
holds every aten and prims overload the dispatcher knows, minus the ones that reach outside tensors:

- an argument of a type that is not tensor data (``Storage``, ``Stream``, script classes, dicts);
- a ``str`` argument, unless its name is in ``HARMLESS_STR_ARGS`` (an enum such as
  ``rounding_mode``, or message text): a string may name a file (``aten.from_file``);
- ``REFUSED_OPS``: process-global state (printing, the cuFFT plan cache, the autograd engine).

Genie's fused ops come from a table the caller gives (``genie.kernels.FUSED_OPS``).

A server also runs only the vetted ops by default (``genie serve --ops vetted``): ``_vetted.VETTED``,
the ops real models use, each with why it may run (an op that takes indices into another tensor is
there only with a bounds check on the server). ``check_vetted`` refuses a graph with any other op,
naming it and why (``NOT_VETTED`` for the notable ones); ``--ops all`` lifts that for a trusted
deployment, back to the registry minus the refusals above.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from functools import cache

import torch

from genie._errors import ProtocolError, UnsupportedOpError
from genie.graph._vetted import REASONS, VETTED

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


# Ops off the vetted list that someone may look for; op packet prefix -> why. Every other op off the
# list is there for the default reason: no model in the zoo it was derived from uses it.
NOT_VETTED: dict[str, str] = {
    "aten._sparse_": "builds a sparse tensor from indices it does not check (sparse layouts have no wire "
                     "form either)",
    "aten.sparse_": "builds a sparse tensor from indices it does not check (sparse layouts have no wire "
                    "form either)",
    "aten._to_sparse": "makes a sparse tensor, whose index tensors a later op can rewrite unchecked",
    "aten.to_sparse": "makes a sparse tensor, whose index tensors a later op can rewrite unchecked",
    "aten._indices": "exposes a sparse tensor's indices for writing",
    "aten._values": "exposes a sparse tensor's values",
    "aten._nested_": "builds a nested tensor from offsets and sizes it does not check",
    "aten.nested_": "builds a nested tensor from offsets and sizes it does not check",
    "aten.max_unpool": "scatters to indices it does not check, and no model in the zoo uses it",
    "aten._unsafe_index": "indexes without bounds checks by design (a compiler's decomposition)",
    "aten._unsafe_masked_index": "indexes without bounds checks by design (a compiler's decomposition)",
    "aten.mkldnn_": "a CPU backend's internal kernel: clients send the generic op, and its integer "
                    "arguments are trusted to match its weights",
    "aten._pad_packed_sequence": "trusts its batch_sizes to describe the data",
    "aten.lstm.data": "trusts its batch_sizes to describe the data (packed sequences)",
    "aten.gru.data": "trusts its batch_sizes to describe the data (packed sequences)",
    "aten.rnn_tanh.data": "trusts its batch_sizes to describe the data (packed sequences)",
    "aten.rnn_relu.data": "trusts its batch_sizes to describe the data (packed sequences)",
    "aten.set_.source_Storage": "adopts arbitrary memory",
}


# enum argument types torch also binds from a plain int, unchecked (``memory_format=-1`` runs, and
# corrupts the process): on the wire such an argument is its tagged value or None, nothing else
ENUM_TYPES: dict[str, type] = {"ScalarType": torch.dtype, "Layout": torch.layout,
                               "MemoryFormat": torch.memory_format}


@cache
def enum_args(name: str) -> tuple[tuple[int, str, type], ...]:
    """(position, name, Python type) of each enum-typed argument of registry op ``name``."""
    out = []
    for i, a in enumerate(overload(registry()[name])._schema.arguments):
        kind = str(a.real_type).removeprefix("Optional[").removesuffix("]")
        if kind in ENUM_TYPES:
            out.append((i, a.name, ENUM_TYPES[kind]))
    return tuple(out)


def check_enum_args(name: str, args: tuple, kwargs: Mapping) -> None:
    """ProtocolError unless each dtype, layout or memory-format argument of op ``name`` (a registry
    name; others are left to ``check_op``) is one, or None."""
    if name not in registry():
        return
    for pos, arg, kind in enum_args(name):
        v = args[pos] if pos < len(args) else kwargs.get(arg)
        if v is not None and type(v) is not kind:
            raise ProtocolError(f"{name}: argument {arg!r} must be a {kind.__module__}.{kind.__name__}, "
                                f"not {type(v).__name__} {v!r:.40}")


def vetted_refusal(name: str) -> str | None:
    """Why op ``name`` may not run on a server that runs vetted ops only, or None when it may."""
    if name.startswith("genie.") or name in VETTED:
        return None
    why = next((w for prefix, w in NOT_VETTED.items() if name.startswith(prefix)), None)
    why = why or "no model in the zoo the list was derived from uses it"
    return (f"not among the ops this server runs ({why}); the server runs the ops real models use, each "
            "with checked arguments, unless its operator started it with `genie serve --ops all` (a "
            "trusted deployment)")


def vetted_reason(name: str) -> str | None:
    """Why vetted op ``name`` may run (its group's reason), or None when it is not vetted."""
    group = VETTED.get(name)
    return None if group is None else REASONS[group]


def check_vetted(ops: Iterable[str]) -> None:
    """UnsupportedOpError naming the first of ``ops`` off the vetted list, and why."""
    for name in sorted(set(ops)):
        why = vetted_refusal(name)
        if why is not None:
            raise UnsupportedOpError(name, why)


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
