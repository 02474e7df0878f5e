"""The Recorder: pending nodes of one thread or one capture, and how they become a Graph and run.

A LazyTensor names ``(node, index)``. Until it runs, a node is pending. A flush turns the pending
nodes that matter (those reaching a wanted or still-alive tensor, writes to storages those read,
and writes to storages a live tensor holds, such as a module buffer's running stats) into a Graph,
runs it, and rebinds every live tensor to a RESIDENT node: its value stays on the executor under a
handle and the next graph reads it from there.

Identity is by tensor, never by content: two buffers with equal bytes are two CONST nodes (the
content digest only spares uploading the bytes twice).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

from genie._errors import GenieError
from genie._profile import sync_point
from genie.graph import (
    CONST,
    INPUT,
    RESIDENT,
    UNDECLARED_ALIASES,
    UNDECLARED_WRITES,
    Graph,
    Node,
    Ref,
    TensorMeta,
    content_digest,
    map_refs,
    undeclared_writes,
)
from genie.runtime import FLUSHES, RunResult, backend

FAILED = "genie.failed"  # a value lost with a run that failed; never sent
_UNSAID = frozenset(UNDECLARED_ALIASES) | frozenset(UNDECLARED_WRITES)

if TYPE_CHECKING:
    from genie.lazy._lazy import LazyTensor



class Recorder:
    """Records ops for one thread (``mode="device"``) or one capture (``"capture"``/``"trace"``)."""

    def __init__(self, mode: str = "device") -> None:
        self.mode = mode
        self.lock = threading.RLock()
        self.pending: list[Node] = []
        self.history: list[Node] | None = [] if mode != "device" else None
        self.constants: dict[str, torch.Tensor] = {}
        self.input_tensors: list[torch.Tensor] = []
        self._input_nodes: dict[int, Node] = {}  # id(cpu tensor) -> its INPUT node
        self._sources: dict[int, Node] = {}  # id -> CONST/INPUT/RESIDENT nodes still referenced
        self._live: dict[int, list[weakref.ref]] = {}  # pending node id -> its LazyTensors
        self._origin: dict[int, Ref] = {}  # RESIDENT node id -> the value it stands for
        self._ids = itertools.count(1)
        self.weight_ids: set[int] = set()  # id() of module buffers seen in a capture: weights
        self.const_cache: dict[int, tuple[torch.Tensor, Node]] = {}  # id(weight) -> it, its CONST node
        # another program's value -> its node here, until this recorder's next run
        self.imports: dict[tuple[int, int], tuple[Node, Node]] = {}
        # storage -> tensors bound to a CONST or RESIDENT node of it (module buffers, a KV cache):
        # a pending write to one of these storages runs even if nothing reads its result
        self._held: dict[int, dict[int, weakref.ref]] = {}  # storage -> id(tensor) -> tensor
        self._held_pruned = 0
        self._created: list[weakref.ref] = []  # capture modes: every tensor made, for outputs
        # genie.compile's hook: sees each run a flush sends (graph, inputs, run kwargs, result)
        self.observer: Callable[[Graph, list, dict, object], None] | None = None

    # -- recording ----------------------------------------------------------------------------
    def new_id(self) -> int:
        return next(self._ids)

    def add(self, node: Node) -> Node:
        if node.op in (CONST, INPUT, RESIDENT):
            self._sources[node.id] = node
        else:
            if node.op in _UNSAID:
                self._undeclared_effects(node)
            self.pending.append(node)
        if self.history is not None:
            self.history.append(node)
        return node

    def _undeclared_effects(self, node: Node) -> None:
        """Writes and views the op's schema does not declare (``genie.graph`` keeps the table the
        server derives writes from): batch norm's running stats, ``_unsafe_view``, ``set_``."""
        writes = tuple(s for s in map(self._storage_of, undeclared_writes(node)) if s is not None)
        if writes:
            node.writes = tuple(dict.fromkeys((*node.writes, *writes)))
        positions = UNDECLARED_ALIASES.get(node.op)
        if positions is not None and node.storages and positions[0] < len(node.args):
            base = node.args[positions[0]]
            s = self._storage_of(base) if type(base) is Ref else None
            if s is not None:
                node.storages = (s, *node.storages[1:])

    def _storage_of(self, r: Ref) -> int | None:
        node = self._sources.get(r.node)
        if node is None:
            node = next((n for n in reversed(self.pending) if n.id == r.node), None)
        return node.storages[r.index] if node is not None and r.index < len(node.storages) else None

    def track(self, t: LazyTensor) -> None:
        node = t._node
        wr = weakref.ref(t)
        if node.op not in (CONST, INPUT, RESIDENT):
            self._live.setdefault(node.id, []).append(wr)
        else:
            self._hold(t)
        if self.history is not None:
            self._created.append(wr)

    def _hold(self, t: LazyTensor) -> None:
        node = t._node
        if node.op in (CONST, RESIDENT):
            s = node.storages[t._index]
            held = self._held.get(s)
            if held is None:
                held = self._held[s] = {}
            held[id(t)] = weakref.ref(t)

    def weight_node(self, t: torch.Tensor, digest_of: Callable[[torch.Tensor], str]) -> Node:
        """The CONST node of weight ``t`` in a capture: one per tensor, whatever its bytes."""
        hit = self.const_cache.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        node = self.const_node(t, digest_of(t))
        self.const_cache[id(t)] = (t, node)
        return node

    def const_node(self, t: torch.Tensor, digest: str | None = None) -> Node:
        digest = digest or content_digest(t)
        self.constants.setdefault(digest, t.detach())
        nid = self.new_id()
        return self.add(Node(nid, CONST, (digest,), outputs=(TensorMeta.of(t),), storages=(nid,)))

    def input_node(self, t: torch.Tensor) -> Node:
        node = self._input_nodes.get(id(t))
        if node is None:
            nid = self.new_id()
            meta = TensorMeta(tuple(t.shape), tuple(t.stride()), t.dtype, 0)
            node = self.add(Node(nid, INPUT, (len(self.input_tensors),), outputs=(meta,), storages=(nid,)))
            self._input_nodes[id(t)] = node
            self.input_tensors.append(t)
        return node

    def resident_node(self, handle: int, meta: TensorMeta, storage: int) -> Node:
        nid = self.new_id()
        node = self.add(Node(nid, RESIDENT, (handle,), outputs=(meta,), storages=(storage,)))
        weakref.finalize(node, backend().free, handle)
        return node

    # -- running ------------------------------------------------------------------------------
    @sync_point  # genie.profile() / GENIE_SYNC_DEBUG: each flush, blamed on the user's line
    def flush(self, wanted: Iterable[LazyTensor] = (), extra: Iterable[Ref] = (), *,
              wait: bool = True) -> tuple[list, list]:
        """Run what is pending; fetch ``wanted`` to CPU; keep ``extra`` and live tensors remote.

        Returns (fetched CPU tensors, (RESIDENT node, meta) of each ``extra``) and leaves nothing
        pending. ``wait=False``: when nothing is fetched and every kept value's meta is known, the
        run is submitted and this returns at once (a failure surfaces where its values are read).
        """
        with self.lock:
            wanted = list(wanted)
            extra = list(extra)
            live, held = self._live_refs()
            fetch_refs = [Ref(t._node.id, t._index) for t in wanted]
            keep_refs = [r for r in itertools.chain(extra, live) if r not in fetch_refs] + \
                [r for r in fetch_refs if r in live]
            roots = fetch_refs + [r for r in keep_refs if r not in fetch_refs]
            nodes = {n.id: n for n in self.pending} | self._sources
            nodes.update((t._node.id, t._node) for t in wanted)
            nodes.update((r.node, wrs[0]()._node) for r, wrs in live.items() if r.node not in nodes)
            for t in wanted:
                if t._node.op == FAILED:
                    raise GenieError(t._node.args[0])
            graph, inputs = build_graph(self.pending, nodes, roots, self.input_tensors, held=held)
            pos = {r: i for i, r in enumerate(roots)}
            fetch, keep = [pos[r] for r in fetch_refs], [pos[r] for r in keep_refs]
            # the plan's graph keeps the outputs: fetch/keep hold; a program flushed before reuses
            # its plan and template split (runtime's FLUSHES)
            graph, run = FLUSHES.planned(graph, fetch, keep, self._constants_of)
            run.update(fetch=fetch, keep=keep, constants=self._constants_of(graph))
            try:
                if wait or fetch_refs or not all(graph.nodes[r.node].outputs for r in graph.outputs):
                    result = backend().run(graph, inputs, **run)
                else:
                    result = _submitted(graph, inputs, run)
            except Exception as e:
                self._fail(live, nodes, e)
                raise
            if self.observer is not None:
                self.observer(graph, inputs, run, result)
            rebound = {}
            for r, handle, meta in zip(keep_refs, result.handles, result.metas, strict=True):
                old = nodes[r.node]
                res = self.resident_node(handle, meta, old.storages[r.index])
                if self.history is not None:
                    self._origin[res.id] = self._origin.get(r.node, r)
                rebound[r] = res
            for r, refs in live.items():
                for wr in refs:
                    t = wr()
                    if t is not None:
                        t._node, t._index = rebound[r], 0
                        self._hold(t)
            self.pending.clear()
            self._live.clear()
            self._sources.clear()  # sources are registered again when a new node reads them
            self.imports.clear()  # and other programs' values imported again: nothing held for ever
            metas = [result.metas[keep_refs.index(r)] for r in extra]
            extra_nodes = [rebound[r] for r in extra]
            return result.fetched, list(zip(extra_nodes, metas, strict=True))

    def _fail(self, live: dict[Ref, list[weakref.ref]], nodes: dict[int, Node], e: Exception) -> None:
        """A run failed: drop what was pending, so later runs do not repeat it, and mark the
        tensors that depended on it so that using them says why instead of running again."""
        why = f"this tensor was lost when the program that computed it failed: {e}"
        for r, refs in live.items():
            old = nodes[r.node]
            if old.op == CONST:
                continue  # its value is still the constant's: nothing was lost
            nid = self.new_id()
            failed = Node(nid, FAILED, (why,), outputs=(old.outputs[r.index] if old.outputs else
                                                        TensorMeta((), (), torch.float32),),
                          storages=(old.storages[r.index],))
            for wr in refs:
                t = wr()
                if t is not None:
                    t._node, t._index = failed, 0
        self.pending.clear()
        self._live.clear()
        self._sources.clear()
        self.imports.clear()

    def _live_refs(self) -> tuple[dict[Ref, list[weakref.ref]], set[int]]:
        """Pending values still referenced, and the storages of CONST/RESIDENT-bound tensors still
        referenced that pending nodes write to: those writes must run."""
        live: dict[Ref, list[weakref.ref]] = {}
        for nid, refs in self._live.items():
            for wr in refs:
                t = wr()
                if t is not None and t._node.id == nid:
                    live.setdefault(Ref(nid, t._index), []).append(wr)
        held: set[int] = set()
        for storage in {s for n in self.pending for s in n.writes} & self._held.keys():
            for wr in list(self._held[storage].values()):
                t = wr()
                if t is None:
                    continue
                node = t._node
                if node.op not in (CONST, RESIDENT) or node.storages[t._index] != storage:
                    continue  # rebound since
                held.add(storage)
                # A constant the program writes to is copied on the executor; whoever still holds
                # it must read the written copy from now on, so it is kept like any live value. A
                # resident is written in place: running the write is enough.
                if node.op == CONST:
                    live.setdefault(Ref(node.id, t._index), []).append(wr)
        if len(self._held) > 2 * self._held_pruned + 64:  # drop tensors and storages long gone
            alive = ((s, {k: wr for k, wr in d.items() if wr() is not None}) for s, d in self._held.items())
            self._held = {s: d for s, d in alive if d}
            self._held_pruned = len(self._held)
        return live, held

    def _constants_of(self, graph: Graph) -> dict[str, torch.Tensor]:
        return {n.args[0]: self.constants[n.args[0]] for n in graph.nodes if n.op == CONST}

    def graph(self, outputs: list[LazyTensor]) -> Graph:
        """The whole recorded program (capture and trace modes) computing ``outputs``."""
        assert self.history is not None
        nodes = {n.id: n for n in self.history}
        roots = [self._origin.get(t._node.id, Ref(t._node.id, t._index)) for t in outputs]
        history = [n for n in self.history if n.op != RESIDENT or n.id not in self._origin]
        history = [_rewrite_origins(n, self._origin) for n in history]
        graph, _ = build_graph(history, nodes, roots, self.input_tensors, keep_inputs=True)
        graph.constants = self._constants_of(graph)
        return graph

    def live_outputs(self) -> list[LazyTensor]:
        """Computed tensors of this capture still referenced, in creation order."""
        alive = (wr() for wr in self._created)
        return [t for t in alive if t is not None and t._node.op not in (CONST, INPUT)]


def _submitted(graph: Graph, inputs: list[torch.Tensor], run: dict) -> RunResult:
    keep = run["keep"]
    handles = backend().submit(graph, inputs, keep=keep, constants=run["constants"],
                               stages=run.get("stages"), stream=run.get("stream", ()))
    return RunResult([], handles, [graph.meta(graph.outputs[p]) for p in keep])


def _rewrite_origins(n: Node, origin: dict[int, Ref]) -> Node:
    if not origin or not any(r.node in origin for r in n.refs()):
        return n
    fix = lambda r: origin.get(r.node, r) if r.index == 0 else r
    return dataclasses.replace(n, args=map_refs(n.args, fix),
                               kwargs={k: map_refs(v, fix) for k, v in n.kwargs.items()})


def build_graph(
    program: list[Node],
    nodes: dict[int, Node],
    roots: list[Ref],
    input_tensors: list[torch.Tensor],
    *,
    keep_inputs: bool = False,
    held: Iterable[int] = (),
) -> tuple[Graph, list[torch.Tensor]]:
    """Select what ``roots`` need from ``program``, renumber densely, and name storages by order.

    A node is needed when a needed node reads it, or when it writes a storage that a root, a later
    needed node or a ``held`` storage (one a live tensor holds) reads: dropping it would change what
    those see.
    """
    storage_of = lambda r: nodes[r.node].storages[r.index] if nodes[r.node].storages else None
    needed: set[int] = {r.node for r in roots}
    storages = {storage_of(r) for r in roots} | set(held)
    for n in reversed(program):
        if n.id in needed or any(s in storages for s in n.writes):
            needed.add(n.id)
            for r in n.refs():
                needed.add(r.node)
                storages.add(storage_of(r))
    if keep_inputs:
        needed.update(n.id for n in program if n.op == INPUT)
    renumber: dict[int, int] = {}
    storage_ids: dict[int, int] = {}
    out: list[Node] = []
    inputs: list[torch.Tensor] = []
    sid = lambda s: storage_ids.setdefault(s, len(storage_ids))
    fix = lambda r: Ref(renumber[r.node], r.index)

    def emit(n: Node) -> None:
        args, kwargs = n.args, n.kwargs
        if n.op == INPUT:
            pos = n.args[0] if keep_inputs else len(inputs)
            inputs.append(input_tensors[n.args[0]])
            args = (pos,)
        elif n.op not in (CONST, RESIDENT):
            args = map_refs(n.args, fix)
            kwargs = {k: map_refs(v, fix) for k, v in n.kwargs.items()}
        renumber[n.id] = len(out)
        out.append(n.replace(id=len(out), args=args, kwargs=kwargs,  # fast copy: per node
                             storages=tuple([sid(s) for s in n.storages]),
                             writes=tuple([sid(s) for s in n.writes]) if n.writes else ()))

    program_ids = {n.id for n in program}
    for n in program:
        if n.id not in needed:
            continue
        for r in n.refs():  # sources recorded elsewhere (an earlier flush, a weight) come first
            if r.node not in renumber and r.node not in program_ids:
                emit(nodes[r.node])
        emit(n)
    for r in roots:
        if r.node not in renumber:
            emit(nodes[r.node])
    if keep_inputs:
        inputs = list(input_tensors)
    return Graph(out, [fix(r) for r in roots]), inputs
