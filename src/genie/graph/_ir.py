"""The one IR: a program-ordered list of nodes, each one aten/prims/genie op.

A value is named by ``Ref(node, index)``. Besides data edges, nodes carry the storage each output
lives in and the storages they write, so that mutation edges (an in-place op on a view of a base
that others read) can be derived without re-running anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import torch

# Ops that are not computations: they bind a value from outside the graph.
INPUT = "genie.input"  # args: (position,)
CONST = "genie.const"  # args: (content digest,); data in Graph.constants
RESIDENT = "genie.resident"  # args: (handle,); a value kept on the executor by an earlier run
SOURCE_OPS = frozenset({INPUT, CONST, RESIDENT})


@dataclass(frozen=True, slots=True)
class TensorMeta:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorMeta:
        return cls(tuple(t.shape), tuple(t.stride()), t.dtype, t.storage_offset())

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __str__(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)}"


@dataclass(frozen=True, slots=True)
class Ref:
    """Output ``index`` of node ``node``."""

    node: int
    index: int = 0

    def __repr__(self) -> str:
        return f"%{self.node}" if self.index == 0 else f"%{self.node}.{self.index}"


@dataclass(eq=False)  # no slots: RESIDENT nodes carry a weakref finalizer that frees them
class Node:
    id: int
    op: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    outputs: tuple[TensorMeta, ...] = ()
    multi: bool = False  # the op returns a tuple/list, even of one tensor
    storages: tuple[int, ...] = ()  # storage id of each output (aliases share one)
    writes: tuple[int, ...] = ()  # storage ids this op mutates
    module: str = ""  # nn.Module path active when it was recorded
    seed: int | None = None  # for random ops: makes remote RNG repeatable

    def replace(self, **changes: Any) -> Node:
        """A copy with ``changes``: ``dataclasses.replace`` without its per-call field walk (it
        costs ~1.7 µs a node, and building a graph copies every node)."""
        if not changes.keys() <= _NODE_FIELDS:
            raise TypeError(f"Node has no field {sorted(changes.keys() - _NODE_FIELDS)[0]!r}")
        new = object.__new__(Node)
        d = new.__dict__
        d.update(self.__dict__)
        d.update(changes)
        return new

    def refs(self) -> list[Ref]:
        """Every Ref in args and kwargs, in order (a list: generators cost a frame per level)."""
        out: list[Ref] = []
        _collect_refs(self.args, out)
        if self.kwargs:
            _collect_refs(self.kwargs.values(), out)
        return out

    def __str__(self) -> str:
        outs = ", ".join(str(m) for m in self.outputs)
        parts = [_fmt(a) for a in self.args] + [f"{k}={_fmt(v)}" for k, v in self.kwargs.items()]
        where = f"  # {self.module}" if self.module else ""
        return f"%{self.id}: {outs} = {self.op}({', '.join(parts)}){where}"


_NODE_FIELDS = frozenset(f.name for f in fields(Node))


def _fmt(v: Any) -> str:
    if isinstance(v, (torch.device, torch.dtype, torch.memory_format, torch.layout)):
        return str(v).removeprefix("torch.")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return repr(v)


def _collect_refs(values: Iterable, out: list[Ref]) -> None:
    for v in values:
        if type(v) is Ref:
            out.append(v)
        elif isinstance(v, (list, tuple)):
            _collect_refs(v, out)


def map_refs(value: Any, fn) -> Any:
    """Rebuild ``value`` with ``fn`` applied to every Ref in it."""
    if type(value) is Ref:
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)([map_refs(v, fn) for v in value])
    return value


_MISSING = object()


def _dead_after(graph: Graph) -> dict[int, list[int]]:
    last: dict[int, int] = {}
    for n in graph.nodes:
        for r in n.refs():
            last[r.node] = n.id
    out: dict[int, list[int]] = {}
    for value, user in last.items():
        out.setdefault(user, []).append(value)
    return out


class Graph:
    """Nodes in program order; node ``i`` has id ``i``.

    ``inputs`` are the ids of the INPUT nodes by position, ``outputs`` the values returned, and
    ``constants`` the CPU data of CONST nodes by content digest (weights, captured tensors).
    """

    def __init__(
        self,
        nodes: list[Node],
        outputs: list[Ref],
        constants: dict[str, torch.Tensor] | None = None,
    ) -> None:
        for i, n in enumerate(nodes):
            if n.id != i:
                raise ValueError(f"node ids must be positions: node at {i} has id {n.id}")
        self.nodes = nodes
        self.outputs = outputs
        self.constants = constants or {}
        # analyses that depend only on the structure (ops and refs), shared by every graph of one
        # template (``Template.fill``, a compiled replay): see ``structural``
        self.shared: dict = {}
        inputs = sorted((n.args[0], n.id) for n in nodes if n.op == INPUT)
        self.inputs = [nid for _, nid in inputs]

    # -- structure ----------------------------------------------------------------------------
    def structural(self, key: object, compute: Callable[[Graph], Any]) -> Any:
        """``compute(self)``, kept for every graph sharing this one's structure (its ops and refs:
        graphs filled from one template, whose holes are sizes, handles, seeds and digests)."""
        shared = self.shared
        hit = shared.get(key, _MISSING)
        if hit is _MISSING:
            hit = shared[key] = compute(self)
        return hit

    def dead_after(self) -> dict[int, list[int]]:
        """node id -> the values whose last reader it is (as an executor frees them; structural)."""
        return self.structural("dead_after", _dead_after)

    def meta(self, ref: Ref) -> TensorMeta:
        return self.nodes[ref.node].outputs[ref.index]

    @cached_property
    def users(self) -> list[list[int]]:
        """For each node, the nodes that read one of its outputs (data edges only)."""
        users: list[list[int]] = [[] for _ in self.nodes]
        for n in self.nodes:
            for r in n.refs():
                if not users[r.node] or users[r.node][-1] != n.id:
                    users[r.node].append(n.id)
        return users

    @cached_property
    def dependencies(self) -> list[frozenset[int]]:
        """For each node, the earlier nodes it must follow: data edges plus mutation edges.

        A write to a storage orders after every earlier reader and writer of it; a read orders
        after the last write. Storage ids tie views to their base, so ``x[0].add_(1)`` orders
        before a later read of ``x``.
        """
        deps: list[frozenset[int]] = []
        last_write: dict[int, int] = {}
        readers: dict[int, list[int]] = {}
        storage_of = {(n.id, i): s for n in self.nodes for i, s in enumerate(n.storages)}
        for n in self.nodes:
            d = {r.node for r in n.refs()}
            read_storages = {storage_of.get((r.node, r.index)) for r in n.refs()}
            for s in read_storages:
                if s in last_write:
                    d.add(last_write[s])
            for s in n.writes:
                d.update(readers.get(s, ()))
                if s in last_write:
                    d.add(last_write[s])
            for s in read_storages:
                readers.setdefault(s, []).append(n.id)
            for s in n.writes:
                last_write[s] = n.id
                readers[s] = []
            d.discard(n.id)
            deps.append(frozenset(d))
        return deps

    def check_inputs(self, inputs) -> None:
        """Raise TypeError unless ``inputs`` match the captured inputs' dtypes and shapes."""
        if len(inputs) != len(self.inputs):
            raise TypeError(f"graph takes {len(self.inputs)} inputs, got {len(inputs)}")
        for pos, t in enumerate(inputs):
            self.check_input(pos, t)

    def check_input(self, pos: int, t: object) -> None:
        """Raise TypeError unless ``t`` matches input ``pos``'s dtype and shape."""
        want = self.nodes[self.inputs[pos]].outputs[0]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"input {pos}: expected a tensor, got {type(t).__name__}")
        if t.dtype != want.dtype or tuple(t.shape) != want.shape:
            raise TypeError(f"input {pos}: graph was captured with {want}, got "
                            f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}")

    # -- identity -----------------------------------------------------------------------------
    @cached_property
    def digest(self) -> str:
        """Structure, shapes and weights: equal graphs compute the same thing."""
        from genie.graph._wire import encode_structure

        return hashlib.blake2b(encode_structure(self), digest_size=16).hexdigest()

    def to_bytes(self) -> bytes:
        """The wire form (``graph._wire``): structure and sizes; constants travel on their own."""
        from genie.graph._wire import graph_to_bytes

        return graph_to_bytes(self)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Graph:
        from genie.graph._wire import graph_from_bytes

        return graph_from_bytes(data)

    def to_fx(self) -> torch.fx.GraphModule:
        from genie.graph._fx import graph_to_fx

        return graph_to_fx(self)

    # -- display ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.nodes)

    def __str__(self) -> str:
        lines = [f"genie.Graph({len(self.nodes)} nodes, {len(self.inputs)} inputs, "
                 f"{len(self.constants)} constants, digest={self.digest[:12]})"]
        lines += [f"  {n}" for n in self.nodes]
        lines.append(f"  return {self.outputs}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<genie.Graph {len(self.nodes)} nodes digest={self.digest[:12]}>"
