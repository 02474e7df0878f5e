"""``genie.compile(fn)``: record a step once per guard key, then replay it as one frame.

Call tree::

    Compiled.__call__(*args, **kwargs)
      Walk (``_guard``)        the tensors read, the objects met, the guard key
      rec.flush(wait=False)    only if something is pending (the argmax token): submitted, not
                               waited for; the server runs it before the replay
      hit: _Entry.replay       the recorded graph with this call's handles/digests/seeds put in, its
                               template split patched (never re-emitted), one submitted run (not
                               waited for); outputs rebuilt around the handles it names, at once:
                               a failure surfaces where they are read (``.cpu()``, ``genie.fetch``)
      miss: _record            run ``fn`` in device mode, flush its outputs kept, and keep what the
                               flush sent (``Recorder.observer``) as an _Entry, if it can be replayed

What can be replayed: one flush made the whole step (no ``.item()`` or data-dependent shape
inside), every resident value it reads is a walked input, every input constant (a token made with
``torch.tensor(...).to(dev)``) is read by exactly one node, and what stays referenced afterwards is
the outputs and the inputs. Otherwise the key is remembered as not replayable and the call runs as
plain device mode. A structure whose shapes change at every call (a growing ``DynamicCache``) is
noticed after three recordings in a row that never replay, and runs as device mode too, without
the extra flush a recording costs (recording again one call in eight, in case the shapes settle).

A training step (forward, ``backward()``, optimizer step) is one such program: under grad mode the
walk reads each parameter's ``.grad`` too, and the new gradients the step leaves on parameters are
set again on replay (``_grads_set``). A replay returns no autograd graph, so a step whose outputs
still need one (a forward whose backward runs outside) is not replayable.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from genie.graph import (
    CONST,
    RESIDENT,
    Graph,
    Node,
    Ref,
    Split,
    TensorMeta,
    content_digest,
    split,
    with_split,
)
from genie.lazy._guard import Unwalkable, Walk
from genie.lazy._lazy import RNG, LazyTensor, current_recorder
from genie.lazy._recorder import FAILED, Recorder
from genie.runtime import backend

MAX_ENTRIES = 8  # recordings kept per compiled function (LRU)
UNSTABLE_AFTER = 3  # recordings of one structure (the key without shapes) in a row, none replayed,
REPROBE_EVERY = 8  # before its calls run as plain device mode, but for one in this many


def compile(fn: Callable) -> Callable:
    """Record ``fn`` once per guard key, then replay it: one frame per call, no per-op recording.

    ``model.forward = genie.compile(model.forward)`` (after ``model.to("remote_accelerator:0")``),
    or any function of remote tensors. The result has ``fn``'s signature and returns what ``fn``
    returns: the same structure (an HF ``ModelOutput`` of the same class), the input objects
    themselves where ``fn`` returned them (the cache), new remote-resident ``LazyTensor``s for
    computed values.

    Guarded (a change records again; a replay is never wrong about these): every input tensor's
    shape, stride, dtype, device and what it aliases; the structure of the arguments, walked
    through lists, tuples, dicts and objects' ``__dict__`` (4 levels); Python scalars met there;
    every ``training`` flag of the module ``fn`` is bound to (and of its submodules), and the
    identity of their parameters, buffers and submodules.

    Not re-run on replay (as with CUDA graphs): ``fn``'s Python code. Its side effects on Python
    objects (attributes set, lists appended to, prints) happen only when it records; values it
    reads from outside its arguments and module (globals, closures, config attributes) are those
    it read when it recorded. In-place writes to tensors (a ``StaticCache``, running stats) are
    part of the program and are replayed on the server.
    """
    return functools.wraps(fn)(Compiled(fn))


class Compiled:
    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._lock = threading.Lock()  # the tables below; each thread records with its own recorder
        self.entries: OrderedDict[tuple, _Entry | None] = OrderedDict()  # None: not replayable
        # structure (the key without shapes) -> [recordings since its last replay, calls since
        # run as plain device mode]
        self.misses: OrderedDict[tuple, list[int]] = OrderedDict()
        self.records = 0
        self.replays = 0

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        """Used as a decorator on a method: bound like a function."""
        return self if obj is None else types.MethodType(self, obj)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rec = current_recorder()
        if rec.mode != "device":  # inside genie.capture()/trace(): the whole program is recorded
            return self.fn(*args, **kwargs)
        # A backward inside the step (a training step) runs on this thread, which holds the lock:
        # autograd's device thread would wait for it while this thread waits for the backward.
        with rec.lock, torch.autograd.set_multithreading_enabled(False):
            walk = self._ready_walk(rec, args, kwargs)
            if walk is None:
                return self.fn(*args, **kwargs)  # unwalkable, another thread's values, lost ones: as is
            key = walk.full_key()
            with self._lock:
                entry = self._entry_for(key)
                if entry is False:
                    counts = self._counts(walk.structure_key())
            if entry is None:
                return self.fn(*args, **kwargs)
            if entry is not False:
                return entry.replay(rec, walk)
            if counts[0] >= UNSTABLE_AFTER:  # shapes never repeat: device mode, and a recording
                counts[1] += 1  # again now and then, in case that changed
                if counts[1] % REPROBE_EVERY:
                    return self.fn(*args, **kwargs)
            out, entry = _record(self.fn, rec, walk, args, kwargs)
            counts[0] += 1
            if entry is not None:
                entry.counts = counts
            with self._lock:
                self.records += 1
                self.entries[key] = entry
                if len(self.entries) > MAX_ENTRIES:
                    self.entries.popitem(last=False)
            return out

    def try_replay(self, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        """``(True, what the call returns)`` if this call replays a recording; ``(False, None)`` if
        it would record or run as device mode, having run nothing but what its inputs were waiting
        for (submitted, not waited for). ``genie.call`` tries this on the event loop's thread
        before it hands a call to a worker thread. The caller holds the recorder's lock.

        Pending work means False at once: its flush may have to plan a new program, or wait for
        a shape, which belongs on the worker thread too."""
        rec = current_recorder()
        if rec.mode != "device" or rec.pending:
            return False, None
        walk = self._ready_walk(rec, args, kwargs)
        if walk is None:
            return False, None
        with self._lock:
            entry = self._entry_for(walk.full_key())
        if not entry:
            return False, None
        return True, entry.replay(rec, walk)

    def _ready_walk(self, rec: Recorder, args: tuple, kwargs: dict) -> Walk | None:
        """The finished walk of this call's inputs, or None when it cannot replay whatever was
        recorded (unwalkable arguments, another thread's values, lost ones). Pending work the
        inputs depend on (the argmax token) is submitted first, not waited for: the server runs it
        before the replay, with no round trip of its own."""
        walk = self._walk(args, kwargs)
        if walk is None:
            return None
        if rec.pending:
            rec.flush(wait=False)
        walk.finish()
        return walk if walk.usable(rec) else None

    def _entry_for(self, key: tuple) -> _Entry | None | bool:
        """The recording under ``key`` (counted as a replay), None if that key cannot replay, False
        if it was never recorded (or evicted). Under ``self._lock``."""
        entry = self.entries.get(key, False)
        if entry is not False:
            self.entries.move_to_end(key)
            if entry is not None:
                entry.counts[0] = 0
                self.replays += 1
        return entry

    def _walk(self, args: tuple, kwargs: dict) -> Walk | None:
        walk = Walk(LazyTensor)
        try:
            owner = getattr(self.fn, "__self__", None)
            if isinstance(owner, torch.nn.Module):
                walk.module(owner)
            walk.value(args)
            walk.value(kwargs)
        except Unwalkable:
            return None
        return walk if walk.remote else None

    def _counts(self, structure: tuple) -> list[int]:
        counts = self.misses.get(structure)
        if counts is None:
            counts = self.misses[structure] = [0, 0]
            if len(self.misses) > 4 * MAX_ENTRIES:
                self.misses.popitem(last=False)
        return counts


# -- one recording -------------------------------------------------------------------------------
@dataclasses.dataclass
class _Entry:
    graph: Graph
    parts: Split | None
    run: dict  # the backend run's keyword arguments, as the recording's flush sent them
    residents: list[tuple[int, int, int]]  # (node, position in parts.ints, leaf) per RESIDENT node
    consts: list[tuple[int, int, int]]  # (node, position in parts.strs, leaf) per input constant
    seeds: list[tuple[int, int]]  # (node, position in parts.ints) per random op
    outputs: Any  # the output skeleton (see _skeleton)
    kept: list[tuple[TensorMeta, torch.device, int]]  # per keep position: meta, device, storage class
    rebound: list[tuple[int, int]]  # (leaf, keep position): constants the step wrote, kept anew
    counts: list[int] = dataclasses.field(default_factory=lambda: [0, 0])  # its structure's (above)
    grads: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # see _grads_set

    def replay(self, rec: Recorder, walk: Walk) -> Any:
        leaves = walk.leaves
        nodes = list(self.graph.nodes)
        ints = self.parts.ints.copy() if self.parts is not None else None
        strs = list(self.parts.strs) if self.parts is not None else None
        constants = dict(self.run["constants"])
        for i, pos, leaf in self.residents:
            h = leaves[leaf]._node.args[0]
            n = nodes[i]
            if n.args[0] != h:  # a cache's handles stay; the new token's change
                nodes[i] = Node(n.id, n.op, (h,), n.kwargs, n.outputs, n.multi, n.storages, n.writes,
                                n.module, n.seed)
                if ints is not None:
                    ints[pos] = h
        for i, pos, leaf in self.consts:
            t = leaves[leaf]
            if type(t) is LazyTensor:
                d = t._node.args[0]
                constants[d] = t._rec.constants[d]
            else:
                d = content_digest(t)
                constants[d] = t.detach()
            nodes[i] = dataclasses.replace(nodes[i], args=(d,))
            if strs is not None:
                strs[pos] = d
        for i, pos in self.seeds:
            s = RNG.next_seed()
            nodes[i] = dataclasses.replace(nodes[i], seed=s)
            if ints is not None:
                ints[pos] = s
        graph = _with_nodes(self.graph, nodes)
        if self.parts is not None:
            with_split(graph, Split(self.parts.skeleton, self.parts.digest, ints, strs))
        run = self.run
        handles = backend().submit(graph, [], keep=run["keep"], constants=constants, stages=run.get("stages"),
                                   stream=run.get("stream", ()))
        metas = [meta for meta, _, _ in self.kept]  # the guards fixed every shape: the recording's
        values: dict[int, LazyTensor] = {}
        storages: dict[int, int] = {}
        for leaf, p in self.rebound:  # a constant input the step wrote: its holders read the copy
            t = leaves[leaf]
            node = rec.resident_node(handles[p], metas[p], t._node.storages[t._index])
            for other in leaves:
                if type(other) is LazyTensor and other._node is t._node and other is not t:
                    other._node, other._index = node, 0
                    rec._hold(other)
            t._node, t._index = node, 0
            rec._hold(t)
            values[p] = t
        used = {p for _, p in self.rebound}

        def kept(p: int) -> LazyTensor:
            hit = values.get(p)
            if hit is None:
                meta, device, cls = self.kept[p]
                s = storages.get(cls)
                if s is None:
                    leaf = leaves[-cls - 1] if cls < 0 else None
                    s = storages[cls] = leaf._node.storages[leaf._index] if leaf is not None else rec.new_id()
                node = rec.resident_node(handles[p], metas[p], s)
                hit = values[p] = LazyTensor(rec, node, 0, metas[p], device)
                used.add(p)
            return hit

        out = _build(self.outputs, kept, leaves, walk.objects)
        for leaf, p in self.grads:  # a training step's new gradients, set as its recording set them
            leaves[leaf].grad = None if p < 0 else kept(p)
        b = backend()
        for p, h in enumerate(handles):  # the same value kept twice by the recording's flush
            if p not in used:
                b.free(h)
        return out


_CACHED = tuple(k for k, v in vars(Graph).items() if isinstance(v, functools.cached_property))


def _with_nodes(graph: Graph, nodes: list) -> Graph:
    """``graph`` with some source nodes swapped for others of the same id, op and meta: what its
    constructor checked still holds (a constructor call re-checks every node, 0.1 ms a step)."""
    g = copy.copy(graph)
    g.nodes = nodes
    for k in (*_CACHED, "_split"):  # analyses of the old nodes, and its split
        g.__dict__.pop(k, None)
    return g


def _record(fn: Callable, rec: Recorder, walk: Walk, args: tuple, kwargs: dict) -> tuple[Any, _Entry | None]:
    sent: list[tuple[Graph, list, dict, Any]] = []
    before = [(t._node, t._index) if type(t) is LazyTensor else None for t in walk.leaves]
    rec.observer = lambda graph, inputs, run, result: sent.append((graph, inputs, run, result))
    try:
        out = fn(*args, **kwargs)
        leaf_of = {id(t): i for i, t in enumerate(walk.leaves)}
        fresh: dict[int, LazyTensor] = {}
        _collect(out, leaf_of, fresh)
        pending = [t for t in fresh.values() if t._node.op not in (CONST, RESIDENT, FAILED)]
        if len(pending) != len(fresh):  # an output bound to a value that is not an input
            rec.observer = None
            return out, None
        if any(t.requires_grad for t in fresh.values()) and not walk.trained():
            return out, None  # a forward whose backward runs outside: a replay has no autograd graph
        if not rec.pending and not pending:
            return out, None
        rec.flush(extra=[Ref(t._node.id, t._index) for t in pending])
    finally:
        rec.observer = None
    if len(sent) != 1 or sent[0][1]:  # more than one run made the step: no one frame replays it
        return out, None
    graph, _, run, result = sent[0]
    try:
        entry = _entry(graph, run, result, walk, before, out, leaf_of)
    except _NotReplayable:
        entry = None
    return out, entry


class _NotReplayable(Exception):
    pass


def _entry(graph: Graph, run: dict, result: Any, walk: Walk, before: list, out: Any,
           leaf_of: dict[int, int]) -> _Entry:
    leaves = walk.leaves
    by_handle: dict[int, int] = {}
    by_digest: dict[str, list[int]] = {}
    for i, b in enumerate(before):
        if b is None:
            if leaves[i].dim() > 0 and i not in walk.params:
                by_digest.setdefault(content_digest(leaves[i]), []).append(i)
            continue
        node, _ = b
        if node.op == RESIDENT:
            by_handle.setdefault(node.args[0], i)
        elif node.op == CONST and i not in walk.params:
            by_digest.setdefault(node.args[0], []).append(i)
    residents, consts, seeds, probe = [], [], [], []
    n_const = 0
    const_uses: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == CONST:
            const_uses[n.args[0]] = const_uses.get(n.args[0], 0) + 1
    for n in graph.nodes:
        if n.op == RESIDENT:
            leaf = by_handle.get(n.args[0])
            if leaf is None:  # a value the arguments do not reach: its handle would be stale
                raise _NotReplayable
            residents.append((n.id, leaf))
            probe.append(dataclasses.replace(n, args=(n.args[0] + 1,)))
        elif n.op == CONST:
            owners = by_digest.get(n.args[0])
            if owners is not None:
                if len(owners) != 1 or const_uses[n.args[0]] != 1:
                    raise _NotReplayable  # equal bytes read twice: which node is this input?
                consts.append((n.id, n_const, owners[0]))
            n_const += 1
            probe.append(n)
        elif n.seed is not None:
            seeds.append(n.id)
            probe.append(dataclasses.replace(n, seed=n.seed + 1))
        else:
            probe.append(n)
    for i, b in enumerate(before):  # a host tensor the step read must be found as a constant
        if b is None and i not in walk.params and leaves[i].dim() > 0 and \
                not any(leaf == i for _, _, leaf in consts):
            raise _NotReplayable
    parts = split(graph)
    res_pos: list[int] = []
    seed_pos: list[int] = []
    if parts is not None:
        moved = np.flatnonzero(split(Graph(probe, graph.outputs)).ints != parts.ints).tolist()
        if len(moved) != len(residents) + len(seeds):
            raise _NotReplayable
        it = iter(moved)
        order = {nid: k for k, (nid, _) in enumerate(residents)}
        seed_set = set(seeds)
        for n in graph.nodes:  # the moved ints are in node order, one per resident or random op
            if n.id in order:
                res_pos.append(next(it))
            elif n.id in seed_set:
                seed_pos.append(next(it))
    else:
        res_pos, seed_pos = [0] * len(residents), [0] * len(seeds)
    # which kept value is which: outputs, rebound constant inputs, or (not replayable) other state
    keep_handles = {h: p for p, h in enumerate(result.handles)}
    roots = [graph.outputs[p] for p in run["keep"]]
    claimed: dict[Ref, int] = {}
    rebound: list[tuple[int, int]] = []
    was_rebound: set[int] = set()
    for i, (t, b) in enumerate(zip(leaves, before, strict=True)):
        if b is not None and (t._node, t._index) != b:
            p = keep_handles.get(t._node.args[0]) if t._node.op == RESIDENT else None
            if p is None or b[0].op != CONST:
                raise _NotReplayable
            if id(b[0]) not in was_rebound:  # replay rebinds every leaf that shared the constant
                was_rebound.add(id(b[0]))
                rebound.append((i, p))
            claimed[roots[p]] = p
    grads = _grads_set(walk, keep_handles, roots, claimed)
    leaf_storage = {}
    for i, t in enumerate(leaves):
        if type(t) is LazyTensor:
            leaf_storage.setdefault(t._node.storages[t._index], i)
    outputs = _skeleton(out, leaf_of, keep_handles, walk.objects)
    kept: list[tuple[TensorMeta, torch.device, int]] = []
    classes: dict[int, int] = {}
    for p, h in enumerate(result.handles):
        t = _output_tensor(out, h)
        if t is None:  # a rebound input, or the same value kept twice: never built from here
            kept.append((result.metas[p], torch.device("remote_accelerator:0"), 0))
            continue
        claimed[roots[p]] = p
        s = t._node.storages[t._index]  # outputs that share a storage (or an input's) still do
        cls = -leaf_storage[s] - 1 if s in leaf_storage else classes.setdefault(s, len(classes))
        kept.append((result.metas[p], t._device, cls))
    for i, p in grads:  # each new gradient in a storage of its own
        if p >= 0:
            g = leaves[i].grad
            cls = classes.setdefault(g._node.storages[g._index], len(classes))
            kept[p] = (result.metas[p], g._device, cls)
    if any(r not in claimed for r in roots):  # state the Python side keeps, made by this step
        raise _NotReplayable
    slots = [(i, pos, leaf) for (i, leaf), pos in zip(residents, res_pos, strict=True)]
    return _Entry(graph, parts, run, slots, consts, list(zip(seeds, seed_pos, strict=True)), outputs, kept,
                  rebound, grads=grads)


def _grads_set(walk: Walk, keep_handles: dict[int, int], roots: list[Ref], claimed: dict[Ref, int]
               ) -> list[tuple[int, int]]:
    """(parameter leaf, keep position, or -1 for None) per parameter whose ``.grad`` the step set
    anew: autograd's first accumulation after ``zero_grad()`` (``set_to_none``) makes a new
    gradient, and a replay sets the one it computed, as the recording left them. Only where the
    walk saw the gradients (grad mode on); a gradient written in place is simply a leaf."""
    leaves, out = walk.leaves, []
    for i, was in walk.grads.items():
        g = leaves[i].grad
        if g is None:
            if was is not None:
                out.append((i, -1))
            continue
        if was is not None and leaves[was] is g:
            continue
        p = keep_handles.get(g._node.args[0]) if type(g) is LazyTensor and g._node.op == RESIDENT else None
        if p is None:
            raise _NotReplayable
        claimed[roots[p]] = p
        out.append((i, p))
    return out


# -- the output structure -------------------------------------------------------------------------
def _collect(v: Any, leaf_of: dict[int, int], fresh: dict[int, LazyTensor], depth: int = 4) -> None:
    if isinstance(v, LazyTensor):
        if id(v) not in leaf_of:
            fresh[id(v)] = v
    elif isinstance(v, list | tuple):
        for x in v:
            _collect(x, leaf_of, fresh, depth)
    elif isinstance(v, dict):
        for x in v.values():
            _collect(x, leaf_of, fresh, depth)


def _output_tensor(out: Any, handle: int) -> LazyTensor | None:
    found: list[LazyTensor] = []

    def visit(v: Any) -> None:
        if isinstance(v, LazyTensor):
            if v._node.op == RESIDENT and v._node.args[0] == handle:
                found.append(v)
        elif isinstance(v, list | tuple):
            for x in v:
                visit(x)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)

    visit(out)
    return found[0] if found else None


def _skeleton(v: Any, leaf_of: dict[int, int], keep: dict[int, int], objects: list[object]) -> Any:
    """How to rebuild ``v``: ("leaf", i), ("kept", p), ("obj", i), ("value", v), or a container."""
    if isinstance(v, torch.Tensor):
        if id(v) in leaf_of:
            return ("leaf", leaf_of[id(v)])
        if isinstance(v, LazyTensor) and v._node.op == RESIDENT and v._node.args[0] in keep:
            return ("kept", keep[v._node.args[0]])
        raise _NotReplayable
    if type(v) in (int, float, bool, str, type(None)) or isinstance(v, torch.dtype | torch.device):
        return ("value", v)
    for i, o in enumerate(objects):
        if o is v:
            return ("obj", i)
    if type(v) in (list, tuple):
        return (type(v), [_skeleton(x, leaf_of, keep, objects) for x in v])
    if isinstance(v, dict):  # plain dicts and HF ModelOutputs (rebuilt from their set fields)
        return ("dict", type(v), [(k, _skeleton(x, leaf_of, keep, objects)) for k, x in v.items()])
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return ("namedtuple", type(v), [_skeleton(x, leaf_of, keep, objects) for x in v])
    raise _NotReplayable  # a new Python object made by the step: replay would not make it


def _build(s: Any, kept: Callable[[int], LazyTensor], leaves: list, objects: list) -> Any:
    kind = s[0]
    if kind == "leaf":
        return leaves[s[1]]
    if kind == "kept":
        return kept(s[1])
    if kind == "obj":
        return objects[s[1]]
    if kind == "value":
        return s[1]
    if kind == "dict":
        return s[1]({k: _build(x, kept, leaves, objects) for k, x in s[2]}) if s[1] is dict else \
            s[1](**{k: _build(x, kept, leaves, objects) for k, x in s[2]})
    if kind == "namedtuple":
        return s[1](*(_build(x, kept, leaves, objects) for x in s[2]))
    return kind(_build(x, kept, leaves, objects) for x in s[1])

