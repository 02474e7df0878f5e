"""Arguments that index into another tensor, checked against it before the op runs (and the few
other sizes a kernel trusts: batch norm's per-channel tensors, a backward's gradient against the
forward's output).

An aten kernel trusts the indices it is given: on CPU some check them and some do not (an
``aten._ctc_loss`` target id of 10^9, or ``aten.segment_reduce`` offsets of 2^40, read and write
far outside the tensor: another client's memory, or a SIGSEGV that ends every client's session),
and on CUDA an out-of-range index is a device-side assert that poisons the whole context. So each
op that takes indices, offsets or lengths into another tensor has a row in ``INDEX_CHECKS``: which
argument holds them, which tensor (and dimension) they address, and what else must hold. The
interpreter runs the row on the real arguments right before the call; a failed check is the
client's program error (``RemoteExecutionError``, naming the op and the value), never a crash.

Which op gets which check is the table in ``_checks`` (``INDEX_CHECKS``); this module has the
parts: a call's arguments by name (``Call``), index ranges read once (``Ranges``), and the checks
that fit many ops (``Bound``, ``index_list``, ``PoolIndices``, ``PerChannel``, ``SameShape``).

Reading an index tensor's range is one host read (a sync on CUDA); ``Ranges`` remembers it per
tensor and version for the rest of the run, so a KV cache position that every layer's
``index_copy_`` reads costs one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from genie.graph import TensorMeta, overload, registry

_INTEGRAL = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class BadIndexError(IndexError):
    """An index, offset or length argument that addresses memory outside the tensor it indexes."""


class Ranges:
    """(min, max) of index tensors, read once per tensor and version within one run."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[torch.Tensor, int, int, int]] = {}

    def of(self, t: torch.Tensor) -> tuple[int, int]:
        hit = self._seen.get(id(t))
        if hit is not None and hit[0] is t and hit[1] == t._version:
            return hit[2], hit[3]
        if t.numel() <= 64 and t.device.type == "cpu":  # a few token ids: cheaper in Python
            values = t.reshape(-1).tolist()
            lo_v, hi_v = min(values), max(values)
        else:
            lo, hi = torch.aminmax(t.reshape(-1))
            lo_v, hi_v = torch.stack((lo.to(torch.int64), hi.to(torch.int64))).tolist()
        self._seen[id(t)] = (t, t._version, lo_v, hi_v)  # holds t: its id is not reused meanwhile
        return lo_v, hi_v


class Call:
    """One call's arguments by schema name (defaults filled in), and what its node declares."""

    __slots__ = ("args", "kwargs", "names", "defaults", "declared", "ranges")

    def __init__(self, sig: Signature, args: Sequence, kwargs: Mapping[str, Any],
                 declared: tuple[TensorMeta, ...], ranges: Ranges) -> None:
        self.args, self.kwargs = args, kwargs
        self.names, self.defaults = sig
        self.declared = declared
        self.ranges = ranges

    def __getitem__(self, name: str) -> Any:
        i = self.names.get(name)
        if i is not None and i < len(self.args):
            return self.args[i]
        if name in self.kwargs:
            return self.kwargs[name]
        return self.defaults.get(name)

    def tensor(self, name: str) -> torch.Tensor | None:
        v = self[name]
        return v if isinstance(v, torch.Tensor) else None

    def int_values(self, name: str) -> torch.Tensor | None:
        """An index argument as an integer tensor (an int list becomes one); None when absent."""
        v = self[name]
        if v is None:
            return None
        if not isinstance(v, torch.Tensor):
            v = torch.tensor(v, dtype=torch.int64) if isinstance(v, (list, tuple)) else torch.tensor([v])
        if v.dtype not in _INTEGRAL:
            raise BadIndexError(f"{name} must be an integer tensor, not {v.dtype}")
        return v

    def within(self, name: str, t: torch.Tensor | None, lo: int, hi: int, what: str) -> None:
        """Every value of ``t`` (argument ``name``) in [lo, hi)."""
        if t is None or t.numel() == 0:
            return
        got_lo, got_hi = self.ranges.of(t)
        if got_lo < lo or got_hi >= hi:
            bad = got_lo if got_lo < lo else got_hi
            raise BadIndexError(f"{name} holds {bad}, out of bounds: it must be in [{lo}, {hi}) ({what}); "
                                "checked before the op ran")


Signature = tuple[dict[str, int], dict[str, Any]]
Check = Callable[[Call], None]


@cache
def signature(op: str) -> Signature:
    """Argument positions by name, and the schema's defaults, of a registry op."""
    args = overload(registry()[op])._schema.arguments
    return ({a.name: i for i, a in enumerate(args)},
            {a.name: a.default_value for a in args if a.has_default_value()})


def dim_of(call: Call, of: torch.Tensor, dim: str | int) -> int:
    d = call[dim] if isinstance(dim, str) else dim
    nd = max(of.dim(), 1)
    if type(d) is not int or not -nd <= d < nd:
        raise BadIndexError(f"dim {d!r} is out of range for a {of.dim()}-d tensor")
    return d % nd


@dataclass(frozen=True)
class Bound:
    """Argument ``index`` holds indices into dimension ``dim`` of argument ``of`` (``dim`` an
    argument's name or a fixed dim; None: ``of`` flattened). ``negative``: -n..-1 count from the
    end, as the op itself allows (take, put_, index_fill); otherwise 0..n-1 only."""

    index: str
    of: str
    dim: str | int | None = None
    negative: bool = False

    def __call__(self, call: Call) -> None:
        of = call.tensor(self.of)
        idx = call.int_values(self.index)
        if of is None or idx is None:
            return
        n = of.numel() if self.dim is None else (of.shape[dim_of(call, of, self.dim)] if of.dim() else 1)
        call.within(self.index, idx, -n if self.negative else 0, n,
                    f"{self.of} has {n} {'elements' if self.dim is None else 'entries in that dim'}")


def index_list(call: Call) -> None:
    """``self[indices]`` (``aten.index``, ``index_put_``): each integer index tensor addresses the
    dim it stands at (negative counts from the end); a bool mask covers as many dims as it has."""
    self_t, indices = call.tensor("self"), call["indices"]
    if self_t is None or not isinstance(indices, (list, tuple)):
        return
    d = 0
    for t in indices:
        if t is None:
            d += 1
            continue
        if not isinstance(t, torch.Tensor):
            raise BadIndexError(f"indices hold a {type(t).__name__}, not a tensor")
        if t.dtype in (torch.bool, torch.uint8):
            if tuple(t.shape) != tuple(self_t.shape[d : d + t.dim()]):
                raise BadIndexError(f"a mask of shape {list(t.shape)} does not match the indexed "
                                    f"dims {list(self_t.shape[d : d + t.dim()])}")
            d += t.dim()
            continue
        if d >= self_t.dim():
            raise BadIndexError(f"too many indices for a {self_t.dim()}-d tensor")
        n = self_t.shape[d]
        call.within("indices", ints(t), -n, n, f"dim {d} has size {n}")
        d += 1


def ints(t: torch.Tensor) -> torch.Tensor:
    if t.dtype not in _INTEGRAL:
        raise BadIndexError(f"an index tensor must be integral, not {t.dtype}")
    return t


def declared_numel(call: Call) -> int | None:
    return call.declared[0].numel if call.declared else None


def nondecreasing(t: torch.Tensor, name: str) -> None:
    if t.shape[-1] > 1 and bool((t[..., 1:] < t[..., :-1]).any()):
        raise BadIndexError(f"{name} must not decrease")


@dataclass(frozen=True)
class PoolIndices:
    """A max pool's backward: each saved index points into its plane of the input (``self``), the
    last ``spatial`` dims."""

    spatial: int

    def __call__(self, call: Call) -> None:
        x, indices, grad = call.tensor("self"), call.int_values("indices"), call.tensor("grad_output")
        if x is None or indices is None or grad is None:
            return
        plane = math.prod(x.shape[-self.spatial:]) if x.dim() >= self.spatial else 0
        if tuple(indices.shape) != tuple(grad.shape):
            raise BadIndexError(f"indices of shape {list(indices.shape)} must match grad_output's "
                                f"{list(grad.shape)}")
        call.within("indices", indices, 0, plane, f"an input plane holds {plane} elements")


@dataclass(frozen=True)
class PerChannel:
    """Batch norm's per-channel tensors: each holds one value per channel of ``input`` (dim 1), as
    the kernel reads (and, in training, writes the running stats) without checking; ``saved`` ones
    (the forward's statistics, handed to the backward) are empty when it ran in eval mode."""

    params: tuple[str, ...]
    saved: tuple[str, ...] = ()

    def __call__(self, call: Call) -> None:
        x = call.tensor("input")
        if x is None:
            return
        if x.dim() < 2:
            raise BadIndexError(f"batch norm takes an input of at least 2 dims, not {x.dim()}")
        c = x.shape[1]
        for name in (*self.params, *self.saved):
            t = call[name]
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise BadIndexError(f"{name} must be a tensor")
            if t.numel() != c and not (name in self.saved and t.numel() == 0 and not call["train"]):
                raise BadIndexError(f"{name} holds {t.numel()} values, but input has {c} channels")


@dataclass(frozen=True)
class SameShape:
    """Arguments a kernel walks in lockstep without comparing their shapes (a backward's gradient
    and the forward's saved output): each group must agree."""

    groups: tuple[tuple[str, ...], ...]

    def __call__(self, call: Call) -> None:
        for group in self.groups:
            shapes = {name: tuple(t.shape) for name in group if (t := call.tensor(name)) is not None}
            if len(set(shapes.values())) > 1:
                raise BadIndexError("these must have one shape: " + ", ".join(
                    f"{name} {list(shape)}" for name, shape in shapes.items()))


@dataclass(frozen=True)
class All:
    checks: tuple[Check, ...]

    def __call__(self, call: Call) -> None:
        for check in self.checks:
            check(call)
