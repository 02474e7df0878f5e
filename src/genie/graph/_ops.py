"""Op names to callables. Only aten, prims and a given fused-op table resolve: never import paths."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache, lru_cache

import torch

from genie._errors import UnsupportedOpError

ALLOWED_NAMESPACES = ("aten", "prims")


@cache
def op_name(func: torch._ops.OpOverload) -> str:
    return f"{func.namespace}.{func._schema.name.split('::', 1)[1]}.{func._overloadname}"


@lru_cache(maxsize=4096)
def _resolve_torch(name: str) -> torch._ops.OpOverload:
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in ALLOWED_NAMESPACES:
        raise UnsupportedOpError(name, "only aten, prims and genie fused ops run remotely")
    ns, packet, overload = parts
    try:
        return getattr(getattr(getattr(torch.ops, ns), packet), overload)
    except (AttributeError, RuntimeError) as e:
        raise UnsupportedOpError(name, "no such op in this torch") from e


def resolve_op(name: str, fused: Mapping[str, Callable] | None = None) -> Callable:
    if name.startswith("genie."):
        if fused is not None and name in fused:
            return fused[name]
        raise UnsupportedOpError(name, "not a known genie fused op")
    return _resolve_torch(name)
