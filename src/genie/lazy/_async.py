"""``await genie.fetch(*tensors)`` and ``await genie.execute(graph, *inputs, fetch=...)``.

Both await from trio or asyncio (the runtime's bridge tells them apart with sniffio) and never block
the event loop on the network: what is still pending is submitted (``Recorder.flush(wait=False)``),
then the values are asked for all at once, so many fetches from many tasks share the one connection
concurrently. Cancelling a call stops its work in the background loop; the values stay where they
were (a fetch moves nothing it was not asked for).
"""

from __future__ import annotations

import torch

from genie._errors import GenieError
from genie.graph import CONST, INPUT, RESIDENT, Graph, Ref
from genie.lazy._device import DEVICE_TYPE
from genie.lazy._lazy import LazyTensor, current_recorder
from genie.lazy._recorder import FAILED
from genie.runtime import backend, execute_graph, submit_graph


async def fetch(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """CPU values of ``tensors`` (remote ones fetched; others as they are), in order.

    ``logits, = await genie.fetch(out.logits)``. The program behind a pending tensor is submitted
    first, without waiting; then every value is fetched concurrently over the one connection. Only
    a tensor whose shape depends on data still pending inside blocks while that shape is learnt.
    """
    out: list[torch.Tensor | None] = [t.detach() if not isinstance(t, LazyTensor) else None for t in tensors]
    lazies = [(i, t) for i, t in enumerate(tensors) if isinstance(t, LazyTensor)]
    handles: list[tuple[int, int]] = []  # (position, handle)
    for _, t in lazies:
        _resident(t)
    for i, t in lazies:
        node = t._node
        if node.op == FAILED:
            raise GenieError(node.args[0])
        if node.op == CONST:  # never written: the host copy is the value
            out[i] = t._rec.constants[node.args[0]].clone()
        else:
            handles.append((i, node.args[0]))
    if handles:
        values = await backend().fetch_async([h for _, h in handles])
        for (i, _), v in zip(handles, values, strict=True):
            out[i] = v
    return out  # type: ignore[return-value]


def _resident(t: LazyTensor) -> None:
    """Bind ``t`` to a RESIDENT (or CONST) node: submit what it is still waiting for."""
    rec = t._rec
    with rec.lock:
        if t._node.op not in (CONST, RESIDENT, FAILED):
            rec.flush(extra=[Ref(t._node.id, t._index)], wait=False)
        elif rec.pending and t._node.op == RESIDENT and any(
                s == t._node.storages[0] for n in rec.pending for s in n.writes):
            rec.flush(wait=False)  # a pending in-place write to it (a cache update) runs first


async def execute(graph: Graph, *inputs: torch.Tensor, fetch: bool = True) -> list[torch.Tensor]:
    """Run ``graph`` (from ``genie.trace``) by its plan with ``inputs`` bound in order.

    ``fetch=True``: CPU tensors back. ``fetch=False``: remote-resident ``LazyTensor``s, returned as
    soon as the run is sent (a failure raises where they are read); pass them to a later
    ``execute`` or ``genie.fetch`` them. An input on the remote device is read where it lives (by
    handle), never copied to the host: a decode loop sends only its new token.
    """
    graph.check_inputs(inputs)  # the caller's mistake: say so before anything is sent
    remote = {p: t for p, t in enumerate(inputs) if isinstance(t, LazyTensor)}
    if remote:
        for t in remote.values():
            _resident(t)
        graph, inputs = _bind_remote(graph, inputs, remote)
    if fetch:
        return await execute_graph(graph, *inputs)
    handles, metas = submit_graph(graph, *inputs)
    rec, device = current_recorder(), torch.device(f"{DEVICE_TYPE}:0")
    return [LazyTensor(rec, rec.resident_node(h, m, rec.new_id()), 0, m, device)
            for h, m in zip(handles, metas, strict=True)]


def _bind_remote(graph: Graph, inputs: tuple, remote: dict[int, LazyTensor]) -> tuple[Graph, tuple]:
    """``graph`` with each remote input's INPUT node read from its handle instead (a CONST-bound one
    from its constant), and the other inputs renumbered."""
    host_positions = [p for p in range(len(inputs)) if p not in remote]
    renumbered = {p: i for i, p in enumerate(host_positions)}
    nodes, constants = [], dict(graph.constants)
    for n in graph.nodes:
        if n.op == INPUT:
            t = remote.get(n.args[0])
            if t is None:
                n = n.replace(args=(renumbered[n.args[0]],))
            else:
                src = t._node
                if src.op == FAILED:
                    raise GenieError(src.args[0])
                if src.op == CONST:
                    constants[src.args[0]] = t._rec.constants[src.args[0]]
                n = n.replace(op=src.op, args=src.args, outputs=(t._meta,))
        nodes.append(n)
    return Graph(nodes, list(graph.outputs), constants=constants), tuple(inputs[p] for p in host_positions)
