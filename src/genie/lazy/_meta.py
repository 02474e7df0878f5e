"""Shape inference on meta tensors, cached by (op, input metadata, non-tensor args).

Running an op on meta tensors costs 1-200 µs; a model's second step should pay only look-ups. The
cache key holds each tensor's (shape, stride, dtype, offset) and every other argument that can change
the output metadata. A Python number where the schema takes a Tensor or a Scalar (``x + i``,
``clamp(min=v)``) promotes by its type alone, so only its type goes in (``1`` and ``1.0`` promote
differently but hash alike); sizes, dims, dtypes and flags go in by value. ``arange``/``range``
are the exception: their Scalars are the output's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from genie.graph import TensorMeta, op_name


@dataclass(frozen=True, slots=True)
class OpInfo:
    """What an op's schema says about aliasing, mutation and results."""

    alias_of: tuple[int | None, ...]  # per output: index of the argument it aliases, or None
    writes: tuple[int, ...]  # argument positions (flattened args, then kwargs by schema order) mutated
    write_kwargs: tuple[str, ...]  # kwarg names mutated (out=)
    returns_tensors: bool  # every result is a Tensor, Tensor?, or Tensor[]
    multi: bool  # returns a tuple or a list
    inplace_self: bool  # returns its first argument (add_, copy_, out= ops)
    seeded: bool  # draws random numbers
    dynamic_shape: bool  # output shape depends on data
    name: str  # "aten.add.Tensor": the name in graphs
    n_returns: int
    returns_list: bool  # returns Tensor[] (split, unbind)
    aliases: bool  # some output aliases an input, or some input is written
    typed: tuple[bool, ...]  # per schema argument: a Python number there is keyed by its type only
    typed_kw: frozenset[str]  # the same, by argument name (for kwargs)
    view_of_self: bool  # one output, a view of argument 0, and nothing written
    void_writes: bool  # returns nothing and writes arguments (``_foreach_add_``): recorded, not run here


# Schema types whose Python-number values only promote (by type): never a size, dim or flag.
_TYPE_ONLY = frozenset({"Tensor", "Optional[Tensor]", "number", "Optional[number]"})
# Ops whose Scalar arguments are the output's size: every value stays in the key.
_SIZED_BY_SCALARS = frozenset({"arange", "range"})


@cache
def op_info(func: torch._ops.OpOverload) -> OpInfo:
    schema = func._schema
    arg_sets = []
    writes, write_kwargs = [], []
    for i, a in enumerate(schema.arguments):
        ai = a.alias_info
        arg_sets.append(set(ai.before_set) if ai is not None else set())
        if ai is not None and ai.is_write:
            (write_kwargs.append(a.name) if a.kwarg_only else writes.append(i))
    alias_of = []
    for r in schema.returns:
        ai = r.alias_info
        src = None
        if ai is not None:
            src = next((i for i, s in enumerate(arg_sets) if s & set(ai.before_set)), None)
        alias_of.append(src)
    rtypes = [str(r.type) for r in schema.returns]
    tensor_types = ("Tensor", "Optional[Tensor]", "List[Tensor]")
    returns_tensors = bool(rtypes) and all(t in tensor_types for t in rtypes)
    multi = len(schema.returns) > 1 or rtypes == ["List[Tensor]"]
    inplace_self = (len(schema.returns) == 1 and alias_of[0] is not None
                    and schema.returns[0].alias_info.is_write)
    tags = func.tags
    aliases = any(a is not None for a in alias_of) or bool(writes) or bool(write_kwargs)
    by_value = func._opname in _SIZED_BY_SCALARS
    typed = tuple(not by_value and str(a.type) in _TYPE_ONLY for a in schema.arguments)
    typed_kw = frozenset(a.name for a, t in zip(schema.arguments, typed, strict=True) if t)
    return OpInfo(tuple(alias_of), tuple(writes), tuple(write_kwargs), returns_tensors, multi,
                  inplace_self, torch.Tag.nondeterministic_seeded in tags,
                  torch.Tag.dynamic_output_shape in tags, op_name(func), len(schema.returns),
                  rtypes == ["List[Tensor]"], aliases, typed, typed_kw,
                  alias_of == [0] and not writes and not write_kwargs,
                  not schema.returns and bool(writes or write_kwargs))


def meta_tensor(m: TensorMeta) -> torch.Tensor:
    t = torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device="meta")
    return t.as_strided(m.shape, m.stride, m.offset) if m.offset else t


class ShapeCache:
    """(op, arg key) -> output metas. Thread-safe enough: a race computes the same value twice."""

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[TensorMeta, ...]] = {}
        self.hits = 0
        self.misses = 0

    def lookup(self, key: tuple) -> tuple[TensorMeta, ...] | None:
        out = self._cache.get(key)
        if out is not None:
            self.hits += 1
        return out

    def store(self, key: tuple, metas: tuple[TensorMeta, ...]) -> None:
        self.misses += 1
        self._cache[key] = metas

    def clear(self) -> None:
        self._cache.clear()
        self.hits = self.misses = 0


SHAPES = ShapeCache()

# An output the op left undefined (a ``Tensor?`` return: ``convolution_backward`` without the input's
# gradient, ``native_layer_norm_backward`` without the weight's). It travels as an empty tensor's
# metadata, so the server's memory prediction charges nothing; the recorder knows it by identity
# and hands the caller ``None`` there, as torch does.
UNDEFINED = TensorMeta((0,), (1,), torch.float32)


def infer(func: torch._ops.OpOverload, meta_args: tuple, meta_kwargs: dict) -> tuple[TensorMeta, ...]:
    """Run ``func`` on meta tensors; raises whatever the meta kernel raises."""
    out = func(*meta_args, **meta_kwargs)
    if out is None:  # an op that only writes its arguments
        return ()
    if isinstance(out, torch.Tensor):
        return (TensorMeta.of(out),)
    return tuple(UNDEFINED if o is None else TensorMeta.of(o) for o in out)
