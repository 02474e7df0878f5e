"""What an op must pass before it runs on a server, and what its result needs after, per run.

- **Indices** (``_checks``): an op that indexes another tensor has its indices, offsets and lengths
  checked against that tensor first.
- **Shared memory** (aliases found by storage, not schemas): the storages of the shared constants a
  run binds are protected. A node that writes (an argument its schema marks ``(a!)``, an ``out=``,
  batch norm's running stats in training) is refused before it runs when what it writes lives in a
  protected storage, whatever the schemas on the way said: ``unsafe_chunk``, ``set_``,
  ``set_data`` and friends return writable aliases their schemas call fresh, and ``type_as`` or
  ``dropout(train=False)`` return their input itself. The schema analysis (``written_sources``)
  still gives every constant a program writes through a declared alias a private copy before the
  run; this catches what it cannot see. Only writing nodes pay: a few ``data_ptr`` reads.
- **Enum arguments**: a dtype, layout or memory format must arrive as one (torch also binds a plain
  int there, unchecked: ``memory_format=-1`` corrupts the process).
- **Fresh memory**: ``empty`` and its kin return whatever the allocator last held there (another
  client's freed values); their storage is zeroed before anyone reads it, as are the bytes a
  ``resize_`` grows a tensor by.

Call tree::

    Guards(GuardTables.of(ops))      per op name, once (op_guards): its index check, written args,
                                     zero-fill, whether it draws random numbers; per structure
      .protect(t)                    bind_constant of a shared constant: its storage
      .call(node, fn, args, kwargs)  an op in ``special`` (the rest are called plainly):
        .before(node, args, kwargs)    BadIndexError / UnsupportedOpError, before the call
        call_seeded(...)               a random op, from the node's own seed (_rng)
        .after(node, out)              fresh memory zeroed
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from genie._errors import UnsupportedOpError
from genie.graph import SOURCE_OPS, UNDECLARED_WRITES, Graph, Node, enum_args, overload, registry
from genie.server._bounds import BadIndexError, Call, Check, Ranges, Signature, signature
from genie.server._checks import index_check, packet
from genie.server._rng import call_seeded, is_seeded

# ops whose result holds memory nobody wrote yet
FRESH_MEMORY = frozenset({"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty",
                          "aten.new_empty_strided", "aten.empty_permuted"})
# ops that may grow their first argument's memory, the new bytes unwritten
GROWS = frozenset({"aten.resize_", "aten.resize_as_"})


@cache
def written(op: str) -> tuple[tuple[int, str], ...]:
    """(position, name) of each argument registry op ``op`` writes, by its schema."""
    if op not in registry():
        return ()
    args = overload(registry()[op])._schema.arguments
    return tuple((i, a.name) for i, a in enumerate(args)
                 if a.alias_info is not None and a.alias_info.is_write)


def _arg(args: list, kwargs: dict, pos: int, name: str) -> Any:
    return args[pos] if pos < len(args) else kwargs.get(name)


@dataclass(frozen=True, slots=True)
class OpGuards:
    """What op ``op`` needs from the guards, worked out once per op name."""

    check: tuple[Check, Signature] | None  # its index check
    enums: tuple[tuple[int, str, type], ...]  # its enum-typed arguments
    writes: tuple[tuple[int, str], ...] | None  # the arguments it writes (None: writes nothing)
    fresh: bool  # its result is memory nobody wrote yet (all of it, or what it grew by)
    random: bool  # it draws random numbers (see _rng)


@cache
def op_guards(op: str) -> OpGuards:
    if op not in registry():  # a genie fused op: writes nothing, draws nothing, returns fresh values
        return OpGuards(None, (), None, False, False)
    w = written(op)
    return OpGuards(index_check(op), enum_args(op), w if w or op in UNDECLARED_WRITES else None,
                    packet(op) in FRESH_MEMORY or packet(op) in GROWS, is_seeded(overload(registry()[op])))


@dataclass(frozen=True, slots=True)
class GuardTables:
    """A graph's ops, sorted by what the guards do for them (kept per graph structure)."""

    checks: dict[str, tuple[Check, Signature]]
    enums: dict[str, tuple[tuple[int, str, type], ...]]
    writes: dict[str, tuple[tuple[int, str], ...]]
    fresh: frozenset[str]
    random: frozenset[str]
    ops: frozenset[str]  # those ``before`` looks at: an index check, an enum argument or a write
    special: frozenset[str]  # those ``call`` handles: ``ops``, random and fresh-memory ops

    @classmethod
    def of(cls, ops: Iterable[str]) -> GuardTables:
        facts = {op: op_guards(op) for op in ops}
        checks = {op: f.check for op, f in facts.items() if f.check is not None}
        enums = {op: f.enums for op, f in facts.items() if f.enums}
        writes = {op: f.writes for op, f in facts.items() if f.writes is not None}
        fresh = frozenset(op for op, f in facts.items() if f.fresh)
        random = frozenset(op for op, f in facts.items() if f.random)
        ops = frozenset(checks) | frozenset(enums) | frozenset(writes)
        return cls(checks, enums, writes, fresh, random, ops, ops | fresh | random)


def guard_tables(graph: Graph) -> GuardTables:
    """``graph``'s ops sorted by what the guards do for them, once per structure (every tier asks)."""
    return graph.structural("guards", lambda g: GuardTables.of({n.op for n in g.nodes
                                                                 if n.op not in SOURCE_OPS}))


class Guards:
    """One run's guards: ``tables`` (per structure), the shared constants it binds, index ranges read."""

    def __init__(self, tables: GuardTables, device: torch.device) -> None:
        self.checks, self.enums, self.writes = tables.checks, tables.enums, tables.writes
        self.fresh, self.random = tables.fresh, tables.random
        self.ops, self.special = tables.ops, tables.special
        self.device = device
        self._shared: list[torch.Tensor] = []  # shared constants this run binds
        self._protected: set[int] | None = None  # their storages' data_ptrs, once a write asks
        self.ranges = Ranges()

    def protect(self, t: torch.Tensor) -> None:
        """``t`` is a shared constant: no node may write its memory (its storage's data_ptr is read
        only when a writing node first asks, so a run that writes nothing never pays)."""
        self._shared.append(t)
        self._protected = None

    @property
    def protected(self) -> set[int]:
        if self._protected is None:
            self._protected = {st.data_ptr() for t in self._shared if (st := t.untyped_storage()).nbytes()}
        return self._protected

    def call(self, node: Node, fn: Callable, args: list, kwargs: dict) -> Any:
        """``fn(*args, **kwargs)`` for ``node``, an op in ``special``: checked first, random from the
        node's own seed, fresh memory zeroed after."""
        if node.op in self.ops:
            self.before(node, args, kwargs)
        grown = _storage_bytes(args[0]) if node.op in self.fresh and args else None  # resize_: before
        if node.op in self.random:
            out = call_seeded(node.op, fn, self.device, node.seed, args, kwargs)
        else:
            out = fn(*args, **kwargs)
        if node.op in self.fresh:
            self.after(node, out, grown)
        return out

    def before(self, node: Node, args: list, kwargs: dict) -> None:
        for pos, name, kind in self.enums.get(node.op, ()):
            v = _arg(args, kwargs, pos, name)
            if v is not None and type(v) is not kind:
                raise BadIndexError(f"argument {name!r} must be a {kind.__module__}.{kind.__name__}, not "
                                    f"{type(v).__name__} {v!r:.40}")
        check = self.checks.get(node.op)
        if check is not None:
            fn, sig = check
            fn(Call(sig, args, kwargs, node.outputs, self.ranges))
        if self._shared and node.op in self.writes:
            self._check_writes(node, args, kwargs)

    def _check_writes(self, node: Node, args: list, kwargs: dict) -> None:
        targets = [(name, _arg(args, kwargs, pos, name)) for pos, name in self.writes[node.op]]
        undeclared = UNDECLARED_WRITES.get(node.op)
        if undeclared is not None:
            positions, (flag_pos, flag_name) = undeclared
            if _arg(args, kwargs, flag_pos, flag_name) is not False:
                names = {i: n for n, i in signature(node.op)[0].items()}
                targets += [(names[p], _arg(args, kwargs, p, names[p])) for p in positions]
        protected = self.protected
        for name, v in targets:
            if _shares(v, protected):
                raise UnsupportedOpError(
                    node.op, f"it would write {name}, which shares memory with a shared constant (a "
                    "weight other programs read) through an alias its schema does not declare; refused "
                    "before it ran. Write to a copy (clone()) instead")

    def after(self, node: Node, out: Any, before: int | None = None) -> None:
        """Zero what ``out`` holds that nobody wrote: all of it (``empty``), or the bytes past
        ``before``, its storage's size before the op (``resize_``)."""
        if not isinstance(out, torch.Tensor):
            return
        st = out.untyped_storage()
        if packet(node.op) in FRESH_MEMORY:
            st.fill_(0)
        elif before is not None and st.nbytes() > before:
            torch.empty(0, dtype=torch.uint8, device=out.device).set_(st)[before:].zero_()


def _storage_bytes(v: Any) -> int | None:
    return v.untyped_storage().nbytes() if isinstance(v, torch.Tensor) else None


def _shares(v: Any, protected: set[int]) -> bool:
    if isinstance(v, torch.Tensor):
        st = v.untyped_storage()
        return st.data_ptr() in protected and st.nbytes() > 0
    if isinstance(v, (list, tuple)):
        return any(_shares(x, protected) for x in v)
    return False
