"""One replayed program over many sessions at once: ``torch.func.vmap`` of the program, traced.

A program (a template filled with one vector of ints) reads three kinds of source: its inputs and
its residents are the session's own, its constants (the weights) are shared. ``batched_program``
runs the program's ops under ``vmap`` with a new leading dimension on the session's sources and
none on the constants, and traces that (``make_fx``, on fake tensors: nothing is computed and no
memory is taken) into one straight-line aten program. The result is a ``Graph`` like any other,
so it runs through the guards and the tiers (interpreter, generated code, Inductor) as any
replayed program does. vmap gives each row what the program gives its session alone, whatever the
program does along its own dimensions (a reduction over dim 0, a softmax): no op can mix rows.

The batched graph's inputs are the program's inputs, then its residents, each with the batch
dimension in front; its outputs are the program's outputs, then the residents the program writes
(their new values, which the caller copies back row by row: the rows are copies, so a batch that
fails leaves every session's values as they were).

What cannot batch, and why (``unbatchable``): a program that draws random numbers (each session
has its own seeds), writes a shared constant, or computes in complex numbers; one whose trace
fails (an op vmap has no rule for, a size read back from the values); one whose batched trace
holds an op the server does not vet.

Call tree::

    unbatchable(graph)                        why a program never batches, or None
    batched_program(graph, inputs, residents, constants, size, device)   -> Batched
      make_fx(vmap(_body))(fake stacked sources)
      _to_graph(fx graph)                    aten nodes -> Graph nodes, metas from the fake values
"""

from __future__ import annotations

import hashlib
import operator
from collections import ChainMap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from genie.graph import (
    CONST,
    INPUT,
    RESIDENT,
    Graph,
    Node,
    Ref,
    TensorMeta,
    content_digest,
    map_refs,
    op_name,
    resolve_op,
    vetted_refusal,
    written_source_nodes,
)
from genie.server._guards import guard_tables
from genie.server._interpreter import fused_ops

_COMPLEX = frozenset({torch.complex32, torch.complex64, torch.complex128})
SESSION_BYTES = 16 << 10  # a constant this small is the session's own (a token, a position, a mask)
MAX_NODES = 20_000  # a bigger program is not traced (a trace takes about 1 ms a node, GIL held)


@dataclass
class Batched:
    """A program's batched form for ``size`` sessions."""

    graph: Graph
    size: int
    written: list[int]  # RESIDENT node ids of the program whose new values follow its outputs
    constants: dict[str, torch.Tensor]  # tensors the trace made itself (an index table), by digest
    key: tuple[str, bytes]  # its own program key, for the tiers


def unbatchable(graph: Graph) -> str | None:
    """Why ``graph`` can never run batched, or None: decided from its ops' schemas and guard tables."""
    def why(g: Graph) -> str | None:
        tables = guard_tables(g)
        if tables.random:
            return "draws random numbers"
        written = written_source_nodes(g)
        if any(g.nodes[i].op == CONST for i in written):
            return "writes a shared constant"
        if any(g.nodes[i].op == INPUT for i in written):
            return "writes its inputs"
        if any(m.dtype in _COMPLEX for n in g.nodes for m in n.outputs):
            return "computes in complex numbers"
        if not g.outputs:
            return "returns nothing"
        if len(g.nodes) > MAX_NODES:
            return f"has over {MAX_NODES} nodes"
        if not any(n.op in (INPUT, RESIDENT) for n in g.nodes):
            return "reads nothing of its session's own (no inputs, no residents)"
        return None
    return graph.structural("unbatchable", why)


def written_residents(graph: Graph) -> list[int]:
    """Ids of the RESIDENT nodes ``graph`` writes (their rows are copied back after a batch)."""
    return graph.structural("written residents", lambda g: sorted(
        i for i in written_source_nodes(g) if g.nodes[i].op == RESIDENT))


def sources(graph: Graph) -> tuple[list[Node], list[Node]]:
    """(the session's own sources, the shared constants), in program order: the batched program's
    source order. A session's own are its residents, then the constants of at most ``SESSION_BYTES``
    (the token ids, positions and masks a replay sends by their bytes); bigger constants are the
    weights, shared. (The ids are structural; the nodes, with this fill's handles and digests, are
    this graph's.)"""
    res, consts = graph.structural("batch sources", lambda g: (
        [n.id for n in g.nodes if n.op == RESIDENT], [n.id for n in g.nodes if n.op == CONST]))
    nodes = graph.nodes
    small = [nodes[i] for i in consts if nodes[i].outputs[0].nbytes <= SESSION_BYTES]
    shared = [nodes[i] for i in consts if nodes[i].outputs[0].nbytes > SESSION_BYTES]
    return [*(nodes[i] for i in res), *small], shared


def _body(graph: Graph, device: torch.device) -> Callable:
    """The program as a plain function of (inputs, own sources, shared constants): what vmap
    traces. Devices in the program's arguments are the client's name for this server's device."""
    table = fused_ops(device)
    fns = {n.op: resolve_op(n.op, table if n.op.startswith("genie.") else None)
           for n in graph.nodes if n.op not in (INPUT, CONST, RESIDENT)}
    own_nodes, shared_nodes = sources(graph)
    own_at = {n.id: i for i, n in enumerate(own_nodes)}
    shared_at = {n.id: i for i, n in enumerate(shared_nodes)}
    written = written_residents(graph)

    def here(a: Any) -> Any:
        return device if type(a) is torch.device and a.type != "cpu" else a

    def body(inputs: list, own: list, shared: list) -> tuple:
        values: dict[int, Any] = {}

        def look(r: Ref) -> Any:
            v = values[r.node]
            return v[r.index] if graph.nodes[r.node].multi else v

        for n in graph.nodes:
            if n.op == INPUT:
                values[n.id] = inputs[n.args[0]]
            elif n.id in own_at:
                values[n.id] = own[own_at[n.id]]
            elif n.id in shared_at:
                values[n.id] = shared[shared_at[n.id]]
            else:
                args = [here(a) for a in map_refs(tuple(n.args), look)]
                kwargs = {k: here(map_refs(v, look)) for k, v in n.kwargs.items() if k != "pin_memory"}
                values[n.id] = fns[n.op](*args, **kwargs)
        return (*(look(r) for r in graph.outputs), *(values[i] for i in written))

    return body


def batched_program(graph: Graph, inputs: Sequence[torch.Tensor], own: Sequence[torch.Tensor],
                    shared: Sequence[torch.Tensor], size: int, device: torch.device,
                    vetted: bool = True) -> Batched | str:
    """``graph`` over ``size`` sessions, traced from one session's inputs and own sources and the
    shared constants (``sources``; only their metadata is read), or why it cannot be (``vetted``:
    every op of the trace must be on the vetted list)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    class Fake(FakeTensorMode):
        @property
        def avoid_device_init(self) -> bool:  # (torch's asks every device module, genie's too, whose
            return not torch.cuda.is_available()  # answer is a round trip to a server, or starts one)

    shared_nodes = sources(graph)[1]
    body = _body(graph, device)
    n_in, n_res = len(inputs), len(own)
    fake = Fake(allow_non_fake_inputs=False)

    def stacked(t: torch.Tensor) -> torch.Tensor:
        with fake:
            return torch.empty((size, *t.shape), dtype=t.dtype, device=t.device)

    args = [*(stacked(t) for t in (*inputs, *own)), *(fake.from_tensor(c) for c in shared)]
    batched = torch.func.vmap(body, in_dims=(0, 0, None), randomness="error")

    def flat(*xs: torch.Tensor) -> tuple:
        return batched(list(xs[:n_in]), list(xs[n_in:n_in + n_res]), list(xs[n_in + n_res:]))

    try:
        with fake:
            gm = make_fx(flat, tracing_mode="real")(*args)
    except Exception as e:  # an op vmap has no rule for, a size read from the values, ...
        return f"its batched trace failed ({type(e).__name__}: {str(e)[:200]})"
    return _to_graph(gm, graph, n_in + n_res, [n.args[0] for n in shared_nodes], size, vetted)


def _meta(v: Any) -> TensorMeta:
    return TensorMeta(tuple(int(s) for s in v.shape), tuple(int(s) for s in v.stride()), v.dtype,
                      int(v.storage_offset()))


def _to_graph(gm: fx.GraphModule, program: Graph, n_batched: int, digests: list[str], size: int,
              vetted: bool) -> Batched | str:
    """The traced FX graph as a genie Graph: placeholders become INPUT (batched sources) and CONST
    (the program's constants, by digest) nodes; tensors the trace made become constants of its own."""
    nodes: list[Node] = []
    refs: dict[fx.Node, Any] = {}
    made: dict[str, torch.Tensor] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, p in enumerate(placeholders):
        nid = len(nodes)
        meta = _meta(p.meta["val"])
        op, arg = (INPUT, i) if i < n_batched else (CONST, digests[i - n_batched])
        nodes.append(Node(nid, op, (arg,), outputs=(meta,)))
        refs[p] = Ref(nid)
    outputs: list[Ref] = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "get_attr":
            t = getattr(gm, n.target)
            d = content_digest(t)
            made[d] = t
            refs[n] = Ref(len(nodes))
            nodes.append(Node(len(nodes), CONST, (d,), outputs=(TensorMeta.of(t),)))
        elif n.op == "call_function" and n.target is operator.getitem:
            base, i = n.args
            refs[n] = Ref(refs[base].node, i)
        elif n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            name = op_name(n.target)
            if vetted and vetted_refusal(name) is not None:
                return f"its batched trace calls {name}, which this server does not vet"
            val = n.meta.get("val")
            multi = isinstance(val, (tuple, list))
            vals = val if multi else (val,)
            if not all(isinstance(v, torch.Tensor) for v in vals):
                return f"its batched trace's {name} returns a non-tensor"
            args = tuple(_arg(a, refs) for a in n.args)
            kwargs = {k: _arg(a, refs) for k, a in n.kwargs.items()}
            refs[n] = Ref(len(nodes))
            nodes.append(Node(len(nodes), name, args, kwargs, tuple(_meta(v) for v in vals), multi))
        elif n.op == "output":
            outs = n.args[0]
            outputs = [refs[o] for o in outs]
        else:
            return f"its batched trace holds a {n.op} node"
    graph = Graph(nodes, outputs, made)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(program.__dict__.get("_program_key")).encode())
    h.update(f"batch {size}".encode())
    key = (h.hexdigest(), b"")
    graph.__dict__["_program_key"] = key
    return Batched(graph, size, written_residents(program), made, key)


def _arg(a: Any, refs: Mapping[fx.Node, Ref]) -> Any:
    if isinstance(a, fx.Node):
        return refs[a]
    if isinstance(a, list):  # (fx's immutable_list too)
        return [_arg(x, refs) for x in a]
    if isinstance(a, tuple):
        return tuple(_arg(x, refs) for x in a)
    return a


def stack_rows(values: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """One batched source from its sessions' values, padded to ``size`` rows by repeating the last
    (a padding row's results are never read, and its writes land in the copy)."""
    rows = list(values) + [values[-1]] * (size - len(values))
    return torch.stack(rows)


def bucket(n: int, max_batch: int) -> int:
    """The batch size a group of ``n`` runs pads to: 2, 3, 4, 6, 8, 12, 16, 24, ... (a power of two or
    1.5 times one), at most ``max_batch``. Each size is one trace and one compiled program, so sizes
    are few; a padding row costs its compute, so they are not far apart."""
    size = 2
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 and size >= 2 else size * 4 // 3
    return min(size, max_batch)


def constants_for(batched: Batched, pool: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """What the batched graph's CONST nodes read: the pool, and the tensors its trace made."""
    return ChainMap(batched.constants, pool) if batched.constants else pool  # type: ignore[arg-type]


__all__ = ["Batched", "batched_program", "bucket", "constants_for", "sources", "stack_rows", "unbatchable",
           "written_residents"]
