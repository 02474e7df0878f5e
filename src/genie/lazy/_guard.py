"""What a ``genie.compile`` call reads, and the key that decides whether a recording still applies.

``Walk`` visits the arguments (tensors, lists, tuples, dicts, and objects' ``__dict__`` or
``__slots__`` such as HF Cache and CacheLayer objects, ``DEPTH`` levels deep; anything deeper, or an
object with neither, makes the call plain device mode) and the modules the function belongs to. It
collects the tensors read (``leaves``, in visit order) and the objects met (``objects``, so that an
output that *is* an input object comes back as that very object), and builds the guard key from:

- each leaf's metadata (shape, stride, offset, dtype, device), what it is bound to (a resident
  value, a constant, or host memory) and which earlier leaf shares its value or its storage;
- the structure walked: container types and lengths, dict keys, object types, attribute names;
- Python scalars (int, float, bool, str, None, numpy scalars, enums), dtypes and devices met on
  the way; functions and classes by identity;
- every module's ``training`` flag, and the identity of its parameters and buffers (``id`` plus
  the node they are bound to, so a reassigned parameter or a weight written on the client misses);
- with grad mode on (a training step), each parameter's ``.grad``: whether it has one, and that
  gradient as a leaf, since ``zero_grad`` and autograd's accumulation read and write it.
"""

from __future__ import annotations

import enum
import functools
import itertools
import operator
import types
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

from genie.graph import CONST, RESIDENT
from genie.lazy._recorder import FAILED

DEPTH = 6  # containers and objects followed (kwargs, a StaticCache, its layers list, a layer: 4)
_SCALARS = (int, float, bool, str, type(None))
_VALUES = (int, float, complex, str, bytes, enum.Enum, torch.dtype, torch.device, torch.memory_format,
           torch.layout, np.generic)
_CODE = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type, functools.partial)


class Unwalkable(Exception):
    """A value the walk cannot vouch for: the call runs as plain device mode, never replayed."""


class Walk:
    def __init__(self, lazy_type: type) -> None:
        self.lazy = lazy_type
        self.key: list = []
        self.shapes: list = []  # leaf signatures (``finish``), apart: without them, the structure
        self.leaves: list[torch.Tensor] = []
        self.params: set[int] = set()  # positions in leaves of module parameters and buffers
        self.objects: list[object] = []
        self._seen: dict[int, int] = {}  # id(object or leaf) -> position, for shared references
        self.remote = False
        self.grads: dict[int, int | None] = {}  # parameter leaf -> its .grad's leaf (None: no grad)
        self._grad_versions: dict[int, int] = {}  # parameter leaf -> its .grad's version then

    def full_key(self) -> tuple:
        return (tuple(self.key), tuple(self.shapes))

    def structure_key(self) -> tuple:
        """The key without leaf signatures, plus the leaves' dtypes: shapes abstracted."""
        return (tuple(self.key), tuple(s[3] if len(s) == 8 else s[:1] for s in self.shapes))

    # -- arguments ------------------------------------------------------------------------------
    def value(self, v: Any, depth: int = DEPTH) -> None:
        t = type(v)
        key = self.key
        if t in _SCALARS:
            key.append((t, v))
        elif isinstance(v, torch.Tensor):
            self.tensor(v, param=False)
        elif depth <= 0:
            raise Unwalkable(f"a {t.__name__} nested deeper than {DEPTH} levels")
        elif t is list or t is tuple:
            key.append((t, len(v)))
            for x in v:
                self.value(x, depth - 1)
        elif t is dict:
            key.append((dict, tuple(v)))
            for x in v.values():
                self.value(x, depth - 1)
        elif isinstance(v, _VALUES):  # numpy scalars, enums, dtypes, devices: by value
            key.append((t, v))
        elif isinstance(v, nn.Module):
            self.module(v)
        elif isinstance(v, tuple | list | dict):  # namedtuples, ModelOutputs: by type, then items
            key.append((t, tuple(v) if isinstance(v, dict) else len(v)))
            self.objects.append(v)
            for x in (v.values() if isinstance(v, dict) else v):
                self.value(x, depth - 1)
        elif isinstance(v, _CODE):  # functions and classes: by identity (not re-run on replay)
            key.append((t, id(v)))
        else:
            self.object(v, depth)

    def object(self, v: object, depth: int) -> None:
        """An object's attributes (``__dict__`` or ``__slots__``); one it is never met twice."""
        seen = self._seen.get(id(v))
        if seen is not None:
            self.key.append(("again", seen))
            return
        attrs = getattr(v, "__dict__", None)
        if attrs is None:
            slots = [s for c in type(v).__mro__ for s in getattr(c, "__slots__", ())]
            if not slots:
                raise Unwalkable(f"a {type(v).__name__} has neither __dict__ nor __slots__")
            attrs = {s: getattr(v, s, None) for s in slots}
        self._seen[id(v)] = len(self.objects)
        self.objects.append(v)
        self.key.append((type(v), tuple(attrs)))
        for x in list(attrs.values()):
            self.value(x, depth - 1)

    def tensor(self, t: torch.Tensor, *, param: bool) -> None:
        seen = self._seen.get(id(t))
        if seen is not None:
            self.key.append(("leaf", seen))
            return
        i = len(self.leaves)
        self._seen[id(t)] = i
        self.leaves.append(t)
        self.key.append(i)  # where it sits in the structure; its signature comes in ``finish``
        if param:
            self.params.add(i)
        if isinstance(t, self.lazy):
            self.remote = True

    def usable(self, rec: object) -> bool:
        """Every remote leaf is this recorder's and not lost to a failed run."""
        lazy = self.lazy
        return all(t._rec is rec and t._node.op != FAILED for t in self.leaves if type(t) is lazy)

    def finish(self) -> None:
        """Each leaf's signature: after the flush that makes pending inputs resident values."""
        values: dict[tuple[int, int], int] = {}  # (node id, index) -> first leaf bound to it
        storages: dict[int, int] = {}  # storage id -> first leaf on it
        sigs = self.shapes
        lazy, params = self.lazy, self.params
        for i, t in enumerate(self.leaves):
            if type(t) is lazy:
                node, index = t._node, t._index
                value = values.setdefault((node.id, index), i)
                storage = storages.setdefault(node.storages[index], i) if node.storages else -1
                if i in params:  # its identity and binding stand for its metadata
                    sigs.append((id(t), node.id, index, value, storage))
                    continue
                meta = t._meta
                sigs.append((node.op if node.op in (CONST, RESIDENT) else "pending", meta.shape, meta.stride,
                             meta.dtype, meta.offset, t._device, value, storage))
            else:
                # a host tensor: 0-dim ones are Python scalars to the recording (their value is
                # baked in), larger ones travel by their bytes on replay
                scalar = t.item() if t.dim() == 0 and t.device.type == "cpu" else None
                sigs.append(("host", tuple(t.shape), t.stride(), t.dtype, t.device, t.storage_offset(),
                             scalar, (id(t), t._version) if i in params else None))

    def module(self, m: nn.Module) -> None:
        """A module's training flags and weights, its submodules' too. The tree is walked once and
        kept (``_Tree``); later calls re-check it with C-level identity compares (most of a compiled
        call's client time was this walk)."""
        seen, leaves, params = self._seen, self.leaves, self.params
        if id(m) in seen:
            self.key.append(("module again", seen[id(m)]))
            return
        seen[id(m)] = -1
        tree = _TREES.get(m)
        if tree is None or not tree.valid():
            tree = _TREES[m] = _Tree(m)
        first, weights = len(leaves), tree.weights
        if not seen.keys().isdisjoint(tree.weight_ids):  # a weight also passed as an argument
            weights = [p for p in weights if id(p) not in seen]
        seen.update(zip(map(id, weights), range(first, first + len(weights)), strict=True))
        params.update(range(first, first + len(weights)))
        leaves.extend(weights)
        if weights and isinstance(weights[0], self.lazy):
            self.remote = True
        # the tree's serial: a submodule swapped (a ReLU for a Tanh) records again, weights or not
        self.key.append(("module", id(m), tree.serial, tuple([mod.training for mod in tree.modules]),
                         len(weights)))
        if torch.is_grad_enabled():  # a training step: inference (no_grad) pays nothing for this
            self._grads(first, weights)

    def _grads(self, first: int, weights: list) -> None:
        grads = [w.grad for w in weights]
        self.key.append(("grads", tuple([g is not None for g in grads])))
        for i, g in enumerate(grads, first):
            if g is None:
                self.grads[i] = None
            else:
                self.grads[i] = len(self.leaves) if id(g) not in self._seen else self._seen[id(g)]
                self._grad_versions[i] = g._version
                self.tensor(g, param=False)

    def trained(self) -> bool:
        """Whether, since the walk, a parameter's gradient was set or written (a backward ran)."""
        leaves = self.leaves
        for i, was in self.grads.items():
            g = leaves[i].grad
            if (g is not None or was is not None) and (was is None or g is not leaves[was]
                                                       or g._version != self._grad_versions[i]):
                return True
        return False


class _Tree:
    """A module tree flattened: its modules in walk order, its weights (parameters and buffers,
    each once), and the identities of every ``_parameters``/``_buffers``/``_modules`` dict and of
    their values, to tell whether anything was added, removed or reassigned since (``_apply`` and
    ``load_state_dict(assign=True)`` write those dicts directly, so no hook would see them). The
    weights are held, so an id seen here is never reused by a new object while this is kept."""

    __slots__ = ("modules", "weights", "weight_ids", "serial", "_dicts", "_shape", "__weakref__")
    _serials = itertools.count()

    def __init__(self, root: nn.Module) -> None:
        modules, weights, ids, dicts = [], [], set(), []
        stack = [root]
        while stack:
            mod = stack.pop()
            if mod is None:  # a submodule slot set to None
                continue
            modules.append(mod)
            for group in (mod._parameters, mod._buffers):
                dicts.append(group)
                for p in group.values():
                    if p is not None and id(p) not in ids:
                        ids.add(id(p))
                        weights.append(p)
            dicts.append(mod._modules)
            stack.extend(reversed(mod._modules.values()))
        self.modules, self.weights, self.weight_ids, self._dicts = modules, weights, ids, dicts
        self.serial = next(_Tree._serials)
        self._shape = self._now()

    def _now(self) -> tuple:
        dicts = self._dicts
        return ([d for m in self.modules for d in (m._parameters, m._buffers, m._modules)],
                tuple(map(len, dicts)), [*itertools.chain.from_iterable(map(dict.values, dicts))])

    def valid(self) -> bool:
        """Every dict, every entry, the very same objects (C-level ``is``, never tensor ``==``)."""
        dicts, lengths, values = self._shape
        now_dicts, now_lengths, now_values = self._now()
        return (lengths == now_lengths and len(values) == len(now_values)
                and all(map(operator.is_, dicts, now_dicts)) and all(map(operator.is_, values, now_values)))


_TREES: weakref.WeakKeyDictionary[nn.Module, _Tree] = weakref.WeakKeyDictionary()
