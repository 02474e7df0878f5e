"""``await genie.fetch(*tensors)``, ``await genie.execute(graph, *inputs, fetch=...)`` and
``await genie.call(fn, *args)``.

All three await from trio or asyncio (the runtime's bridge tells them apart with sniffio) and never
block the event loop on the network: what is still pending is submitted (``Recorder.flush(wait=False)``),
then the values are asked for all at once, so many fetches from many tasks share the one connection
concurrently. Cancelling a fetch or execute stops its work in the background loop; the values stay
where they were (a fetch moves nothing it was not asked for).

Nor do they block the loop on the recorder: another task's ``genie.call`` may hold it on a worker
thread for as long as a recording takes, so what needs it and finds it taken moves to a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from genie._errors import GenieError
from genie.graph import CONST, INPUT, RESIDENT, Graph, Ref
from genie.lazy import _lazy
from genie.lazy._compile import Compiled
from genie.lazy._device import DEVICE_TYPE
from genie.lazy._lazy import LazyTensor, current_recorder
from genie.lazy._recorder import FAILED, Recorder
from genie.runtime import backend, execute_graph, in_thread, submit_graph


async def fetch(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """CPU values of ``tensors`` (remote ones fetched; others as they are), in order.

    ``logits, = await genie.fetch(out.logits)``. The program behind a pending tensor is submitted
    first, without waiting; then every value is fetched concurrently over the one connection. Only
    a tensor whose shape depends on data still pending inside blocks while that shape is learnt.
    """
    out: list[torch.Tensor | None] = [t.detach() if not isinstance(t, LazyTensor) else None for t in tensors]
    lazies = [(i, t) for i, t in enumerate(tensors) if isinstance(t, LazyTensor)]
    handles: list[tuple[int, int]] = []  # (position, handle)
    await _without_blocking(_residents, [t for _, t in lazies])
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


def _residents(tensors: list[LazyTensor]) -> None:
    for t in tensors:
        _resident(t)


async def _without_blocking(fn: Callable[[list[LazyTensor]], None], tensors: list[LazyTensor]) -> None:
    """``fn(tensors)``, which takes their recorders' locks: here if they are free, else on a worker
    thread (another task's ``genie.call`` is recording), so that the event loop never waits for
    them. (A flush stays here, where ``genie.profile`` blames it on the caller's line.)"""
    taken: list[Recorder] = []
    try:
        for rec in {id(t._rec): t._rec for t in tensors}.values():
            if not rec.lock.acquire(blocking=False):
                break
            taken.append(rec)
        else:
            fn(tensors)
            return
    finally:
        for rec in taken:
            rec.lock.release()
    await in_thread(fn, tensors)


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
        await _without_blocking(_residents, list(remote.values()))
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


# -- genie.call: a step from inside an event loop ---------------------------------------------------
async def call(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` from inside an event loop (trio or asyncio), which it never blocks.

    ``tok = await genie.call(step, model, tok, cache)``. A ``genie.compile``'d ``fn`` (or a
    module whose ``forward`` is one, or a method compiled with it) whose recording for these
    arguments exists replays at once, on this thread: one frame submitted, nothing waited for.
    Anything else (a first call, which records and uploads weights; a new shape; a function that is
    not compiled; device-mode ops that wait for the server; ops recorded on this thread and still
    pending, whose flush may plan a new program) runs on a worker thread while the loop serves
    other tasks. That thread records into this thread's recorder, so what it makes is this
    thread's as if called here (a later call replays on the loop), and it runs under this thread's
    grad mode. What it leaves pending is submitted before the await returns.

    Every Genie op of a request belongs inside ``genie.call`` or ``genie.fetch``: a plain op on the
    loop's thread (an ``argmax`` after the call) waits while another task's call records. Cancelling
    the await delivers the cancellation at once; a recording in progress ends in its thread and is
    kept. Inside ``genie.capture()`` this is a plain call, recorded.
    """
    rec = current_recorder()
    if rec.mode != "device":
        return fn(*args, **kwargs)
    target = _compiled(fn, args)
    if target is not None and rec.lock.acquire(blocking=False):
        try:
            hit, out = target[0].try_replay(target[1], kwargs)
        finally:
            rec.lock.release()
        if hit:
            return out
    return await in_thread(_borrowing, rec, torch.is_grad_enabled(), fn, args, kwargs)


def _compiled(fn: Callable[..., Any], args: tuple) -> tuple[Compiled, tuple] | None:
    """(the Compiled that ``fn(*args)`` calls first, its arguments), when the call is just that:
    a Compiled, a method bound to one, or a module with no hooks of its own whose ``forward`` is
    one of those. Else None: the call goes to a worker thread as it is."""
    if isinstance(fn, torch.nn.Module):
        if fn._forward_hooks or fn._forward_pre_hooks or fn._backward_hooks or fn._backward_pre_hooks:
            return None
        fn = fn.forward
    owner = getattr(fn, "__self__", None)
    if owner is not None and isinstance(getattr(fn, "__func__", None), Compiled):
        return fn.__func__, (owner, *args)
    return (fn, args) if isinstance(fn, Compiled) else None


def _borrowing(rec: Recorder, grad: bool, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """On the worker thread: ``fn`` recording into ``rec`` (the caller's), under the caller's grad
    mode; what it leaves pending is submitted."""
    tls = _lazy._tls
    saved, tls.device = tls.device, rec
    try:
        with torch.set_grad_enabled(grad):
            out = fn(*args, **kwargs)
        with rec.lock:
            if rec.pending:
                rec.flush(wait=False)
        return out
    finally:
        tls.device = saved
