"""The one path a graph (a plan's graph, with its stages) runs by on an executor.

``genie serve``'s worker (``_job.run_job``), the in-process backend (``InProcessExecutor``, which
``genie._setup`` injects into ``runtime.LocalBackend``) and ``genie._plan_exec.run_plan`` all call
``run_graph``: they differ only in where constants and residents live and in the hooks they pass, as
torch.fx's Interpreter is varied by subclassing (``Interpreter`` -> ``StagedInterpreter``).

Call tree::

    run_graph(graph, inputs, device=, constants=, residents=, schedule=, ...)
      private_constants(graph, written)   each CONST node the program writes: its own copy, never
                                          the shared (or the caller's) tensor; the interpreter
                                          refuses any other write to a constant's memory
      Interpreter(...)                    no schedule: program order
      StagedInterpreter(...)              a schedule: stage by stage, get_input / on_output hooks
      tiers.run(key, ...)                 a replayed program with no schedule: the interpreter, then
                                          generated code, then Inductor (``_tiers``)
      compute(lambda: interp.run(inputs)) the caller's wrapper (a server's device stream and slot)
      -> values of graph.outputs, and the staged run's timeline
"""

from __future__ import annotations

import dataclasses
from collections import ChainMap
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TypeVar

import torch

from genie._errors import GenieError
from genie.graph import CONST, Graph, Node, StageSchedule, TensorMeta
from genie.graph import written_sources as _derived_writes
from genie.server._interpreter import Interpreter, own_storage
from genie.server._residency import ConstantPool, Residents
from genie.server._staged import StagedInterpreter, Timeline
from genie.server._tiers import RunValues, Tiers, program_key

T = TypeVar("T")


def run_graph(graph: Graph, inputs: Sequence[torch.Tensor | None], *, device: torch.device,
            constants: Mapping[str, torch.Tensor], residents: Mapping[int, torch.Tensor] | None = None,
            schedule: StageSchedule | None = None, layout: list[list[int]] | None = None,
            written: Collection[str] | None = None,
            get_input: Callable[[int], torch.Tensor] | None = None,
            on_output: Callable[[int, torch.Tensor], None] | None = None, early: Collection[int] = (),
            meter: bool = False, on_node: Callable[[Node], None] | None = None,
            compute: Callable[[Callable[[], list[torch.Tensor]]], list[torch.Tensor]] | None = None,
            tiers: Tiers | None = None) -> tuple[list[torch.Tensor], Timeline | None]:
    """Run ``graph`` on ``inputs`` (a None is a streamed input ``get_input`` binds when its first
    reader's stage starts); with ``schedule``, stage by stage, calling ``on_output(i, value)`` for
    each output ``i`` in ``early`` right after its stage. ``written``: digests of constants the
    program writes (derived from the op schemas when not given). ``tiers``: a replayed program (a
    filled template) runs at its tier, unless it streams inputs, sends outputs early or is timed.
    Returns the output values and, for a staged run, its timeline."""
    # a schedule matters only for what it streams in, sends early or times: without those, a staged
    # run is its program, and may run at its tier
    plain = schedule is None or (not early and not meter and all(t is not None for t in inputs))
    key = program_key(graph) if tiers is not None and plain else None
    if written is None:
        written, _ = written_sources(graph)
    clones: dict[str, torch.Tensor] = {}
    if written:  # constants are shared (or the caller's own tensors): writes go to copies
        graph, clones = private_constants(graph, written, constants)
        constants = ChainMap(clones, constants)  # type: ignore[arg-type]
    if key is not None:
        assert tiers is not None
        bound = RunValues(graph, inputs, constants, residents or {}, clones.keys(), on_node)  # type: ignore[arg-type]
        tiered = lambda: tiers.run(key, bound)  # noqa: E731
        return (compute(tiered) if compute is not None else tiered()), None
    interp: Interpreter
    if schedule is None:
        interp = Interpreter(graph, device=device, constants=constants, residents=residents, on_node=on_node,
                             private=clones.keys())
    else:
        interp = StagedInterpreter(graph, schedule, device=device, constants=constants, residents=residents,
                                   get_input=get_input, on_output=on_output, early=early, meter=meter,
                                   layout=layout, private=clones.keys())
        interp.on_node = on_node
    run = lambda: interp.run(inputs)  # type: ignore[arg-type]  # noqa: E731
    try:
        values = compute(run) if compute is not None else run()
        timeline = interp.timeline if isinstance(interp, StagedInterpreter) else None
    finally:
        # an interpreter is a reference cycle (its table of bound methods): without this, what it
        # held (inputs, which are received frames counted against the memory limit, and values)
        # would wait for a GC pass
        vars(interp).clear()
    return values, timeline


def unshared(values: Sequence[torch.Tensor], pool: Mapping[str, torch.Tensor],
             consts: Collection[str]) -> list[torch.Tensor]:
    """Values to keep, each with memory of its own: one that is a shared constant (or a view of
    one) is copied, or a later in-place write through its handle would reach every client's
    weight. ``consts``: the constants the run read."""
    shared = {pool[d].untyped_storage().data_ptr() for d in set(consts) if d in pool}
    if not shared:
        return list(values)
    return [_copy(v) if v.untyped_storage().data_ptr() in shared else v for v in values]


def _copy(v: torch.Tensor) -> torch.Tensor:
    """A copy with memory of its own and the view's offset and strides, which the client recorded
    for it: a view of part of its storage copies that whole storage, since ``as_strided`` with an
    explicit offset addresses the storage (it read other elements, or memory nobody wrote, from a
    copy of the view's elements alone)."""
    storage = v.untyped_storage()
    if v.storage_offset() == 0 and storage.nbytes() == v.numel() * v.element_size():
        return v.clone(memory_format=torch.preserve_format)  # the view is its whole storage
    return torch.empty(0, dtype=v.dtype, device=v.device).set_(storage.clone(), v.storage_offset(), v.shape,
                                                              v.stride())


def written_sources(graph: Graph) -> tuple[list[str], bool]:
    """(digests of constants the graph writes to, whether it writes to a resident value), derived
    from the op schemas by ``genie.graph.written_sources``: the client's ``Node.writes`` and
    ``Node.storages`` play no part, so an undeclared write still gets a private copy."""
    return _derived_writes(graph)


def private_constants(graph: Graph, written: Collection[str],
                      pool: Mapping[str, torch.Tensor]) -> tuple[Graph, dict[str, torch.Tensor]]:
    """``graph`` with each CONST node whose digest is in ``written`` reading its own copy, under
    its own key, and those copies. Per node, not per digest: two buffers with equal bytes are two
    values, and a write to one must not show in the other."""
    nodes = list(graph.nodes)
    clones: dict[str, torch.Tensor] = {}
    for i, n in enumerate(nodes):
        if n.op == CONST and n.args[0] in written:
            key = f"{n.args[0]}#{n.id}"  # never a digest: hex only
            clones[key] = pool[n.args[0]].clone()
            nodes[i] = dataclasses.replace(n, args=(key,))
    out = Graph(nodes, graph.outputs, graph.constants)
    out.shared = graph.shared  # only constants' keys changed, not the structure
    return out, clones


class InProcessExecutor:
    """The executor without a wire: one pool of constants and one connection's residents, as a
    server holds them, run through ``run_graph``. Not thread-safe: ``runtime.LocalBackend`` locks."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.pool = ConstantPool()
        self.residents = Residents(self.pool)

    def missing(self, digests: Sequence[str]) -> list[str]:
        return self.pool.missing(digests)

    def put_constant(self, digest: str, t: torch.Tensor) -> None:
        self.pool.put(digest, t, lambda host: own_storage(host.to(self.device)))

    def run(self, graph: Graph, inputs: Sequence[torch.Tensor], *, fetch: Sequence[int], keep: Sequence[int],
            stages: StageSchedule | None = None, trace: bool = False, names: Sequence[int] | None = None,
            ) -> tuple[list[torch.Tensor], list[int], list[TensorMeta], dict | None]:
        """(fetched values on the device, handles and metas of kept ones, the timeline if traced);
        ``names``: the caller's handles for the kept values."""
        layout = stages.check(graph) if stages is not None else None
        graph.check_inputs(inputs)
        values, timeline = run_graph(graph, inputs, device=self.device, constants=self.pool,
                                   residents=self.residents, schedule=stages, layout=layout, meter=trace)
        kept = [values[i] for i in keep]
        consts = [n.args[0] for n in graph.nodes if n.op == CONST]
        handles = self.residents.keep(unshared(kept, self.pool, consts),
                                      self.residents.check_names(names, len(kept)))
        metas = [TensorMeta.of(v) for v in kept]
        wire = timeline.to_wire() if trace and timeline is not None else None
        return [values[i] for i in fetch], handles, metas, wire

    def fetch(self, handles: Sequence[int]) -> list[torch.Tensor]:
        """Kept values, on the device."""
        missing = [h for h in handles if h not in self.residents]
        if missing:
            raise GenieError(f"handle {missing[0]} is not kept here (freed, or never made)")
        return [self.residents[h] for h in handles]

    def free(self, handles: Sequence[int]) -> None:
        self.residents.free(handles)
