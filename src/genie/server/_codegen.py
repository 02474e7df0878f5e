"""Tier 1: a graph as one generated Python function, as torch.fx's code generation turns a graph
into a ``forward``: every op resolved once, its arguments written out, values freed after their last
reader, and no per-node look-up at run time.

The source holds only names this module makes up from node ids (``v12``, ``f12``, ``k3``) and
integer positions; every value the client sent (scalars, lists, strings, devices, kwarg names) is
an object in the function's namespace, never text. So no client string reaches ``compile``.

What the interpreter does per node, the generated code does where it can matter:

- ops the guards handle (index checks, enum arguments, writes near shared memory, seeded random ops,
  fresh memory) go through the run's ``Guards.call``, as in the interpreter;
- ``check_output`` runs for the sources (their declared metas are the client's), for ops whose output
  size depends on data, for multi-output ops, and for every node whose output tier 0 had to lay out
  again (``conformed``): for the rest, the fixed program on fixed metas makes what tier 0 checked;
- ``on_node`` (a run's cancellation) is called after each node;
- an exception names its node's op, as the interpreter's does.

Graphs with complex values stay on the interpreter (their conj/neg views need its bookkeeping).

Call tree::

    Program.build(graph, device, conformed)     None where the graph cannot be generated
    Program.run(graph, inputs, constants=, residents=, guards=, private=, on_node=)
"""

from __future__ import annotations

import linecache
import traceback
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch

from genie._errors import GenieError, RemoteExecutionError, RemoteMemoryError
from genie.graph import CONST, INPUT, RESIDENT, Graph, Node, Ref, registry, resolve_op
from genie.server._guards import Guards, guard_tables
from genie.server._interpreter import fused_ops, out_of_memory, own_storage
from genie.server._memory import check_output

_COMPLEX = frozenset({torch.complex32, torch.complex64, torch.complex128})
_DATA_SIZED = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)
_counter = 0


def _data_sized(op: str) -> bool:
    """Whether ``op``'s output size depends on its input values (``nonzero``, ``item``)."""
    fn = registry().get(op)
    tags = getattr(fn, "tags", ()) if fn is not None else ()
    return any(t in tags for t in _DATA_SIZED)


def _merge(fixed: dict, names: tuple[str, ...], values: tuple) -> dict:
    """Keyword arguments: the fixed ones, plus those that are values of this run."""
    return {**fixed, **dict(zip(names, values, strict=True))}


class _Writer:
    """Source lines, and the namespace of objects they name."""

    def __init__(self, graph: Graph, device: torch.device) -> None:
        self.graph = graph
        self.device = device
        self.ns: dict[str, Any] = {"C": check_output, "own": own_storage, "D": device, "merge": _merge}
        self.lines: list[str] = []
        self.line_node: dict[int, Node] = {}  # source line number -> the node it runs

    def obj(self, value: Any) -> str:
        name = f"k{len(self.ns)}"
        self.ns[name] = value
        return name

    def ref(self, r: Ref) -> str:
        return f"v{int(r.node)}[{int(r.index)}]" if self.graph.nodes[r.node].multi else f"v{int(r.node)}"

    def expr(self, a: Any) -> str:
        if type(a) is Ref:
            return self.ref(a)
        if type(a) in (list, tuple) and _has_ref(a):
            inner = ", ".join(self.expr(x) for x in a)
            return f"[{inner}]" if type(a) is list else f"({inner},)"
        if type(a) is torch.device:
            return self.obj(a if a.type == "cpu" else self.device)
        return self.obj(a)

    def emit(self, line: str, node: Node | None = None) -> None:
        self.lines.append("    " + line)
        if node is not None:
            self.line_node[len(self.lines) + 1] = node  # +1: the ``def`` line comes first


def _has_ref(a: Any) -> bool:
    if type(a) is Ref:
        return True
    return type(a) in (list, tuple) and any(_has_ref(x) for x in a)


class Program:
    """A graph's generated function, and how to bind a run's sources to it."""

    def __init__(self, fn: Callable, source: str, line_node: dict[int, Node], filename: str) -> None:
        self.fn = fn
        self.source = source
        self.line_node = line_node
        self.filename = filename

    @classmethod
    def build(cls, graph: Graph, device: torch.device, conformed: Collection[int]) -> Program | None:
        """The program of ``graph``; ``conformed``: nodes whose output tier 0 laid out again. None
        for a graph that stays on the interpreter (complex values)."""
        if any(m.dtype in _COMPLEX for n in graph.nodes for m in n.outputs):
            return None
        w = _Writer(graph, device)
        table = fused_ops(device)
        dead = graph.dead_after()
        keep = {r.node for r in graph.outputs}
        checked = set(conformed)
        special = guard_tables(graph).special
        for n in graph.nodes:
            v = f"v{int(n.id)}"
            node = w.obj(n)
            if n.op == INPUT:
                w.emit(f"{v} = C({node}, own(I[{int(n.args[0])}].to(D)))", n)
            elif n.op == CONST:
                w.emit(f"{v} = C({node}, K[{int(n.id)}])", n)
            elif n.op == RESIDENT:
                w.emit(f"{v} = C({node}, R[{int(n.id)}])", n)
            else:
                fn = resolve_op(n.op, table if n.op.startswith("genie.") else None)
                w.emit(cls._call(w, n, node, fn, n.op in special), n)
                if n.id in checked or n.multi or n.op.startswith("genie.") or _data_sized(n.op):
                    w.emit(f"{v} = C({node}, {v})", n)
            w.emit(f"T({node})", n)
            gone = [d for d in dead.get(n.id, ()) if d not in keep]
            if gone:
                w.emit("del " + ", ".join(f"v{int(d)}" for d in gone))
        w.emit("return [" + ", ".join(w.ref(r) for r in graph.outputs) + "]")
        global _counter
        _counter += 1
        filename = f"<genie tier 1 #{_counter}>"
        source = "def program(I, K, R, G, T):\n" + "\n".join(w.lines) + "\n"
        # registered, so that a traceback through it shows the line (as torch.fx does)
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec"), w.ns)  # noqa: S102 (no client text in ``source``)
        return cls(w.ns["program"], source, w.line_node, filename)

    @staticmethod
    def _call(w: _Writer, n: Node, node: str, fn: Callable, guarded: bool) -> str:
        kwargs = dict(n.kwargs)
        kwargs.pop("pin_memory", None)
        fixed = {k: (w.device if type(a) is torch.device and a.type != "cpu" else a)
                 for k, a in kwargs.items() if not _has_ref(a)}
        with_refs = {k: a for k, a in kwargs.items() if _has_ref(a)}
        args = ", ".join(w.expr(a) for a in n.args)
        if with_refs:  # kwarg names are objects too: ``merge`` pairs them with this run's values
            values = ", ".join(w.expr(a) for a in with_refs.values())
            kw = f"merge({w.obj(fixed)}, {w.obj(tuple(with_refs))}, ({values},))"
        else:
            kw = w.obj(fixed) if fixed else ""
        if guarded:
            return f"v{int(n.id)} = G.call({node}, {w.obj(fn)}, [{args}], {kw or '{}'})"
        return f"v{int(n.id)} = {w.obj(fn)}({', '.join(x for x in (args, kw and '**' + kw) if x)})"

    def run(self, graph: Graph, inputs: Sequence[torch.Tensor], *, constants: Mapping[str, torch.Tensor],
            residents: Mapping[int, torch.Tensor], guards: Guards, private: Collection[str] = (),
            on_node: Callable[[Node], None] | None = None) -> list[torch.Tensor]:
        """Run on this run's sources: ``graph`` (the one the program was built from, or a fill of the
        same template with the same ints) names its constants and residents."""
        graph.check_inputs(inputs)
        consts: dict[int, torch.Tensor] = {}
        res: dict[int, torch.Tensor] = {}
        nodes = graph.nodes
        for i in graph.structural("bound sources", _bound_sources):  # (this run's digests and handles)
            n = nodes[i]
            if n.op == CONST:
                t = consts[i] = constants[n.args[0]]
                if n.args[0] not in private:
                    guards.protect(t)
            else:
                res[i] = residents[n.args[0]]
        try:
            return self.fn(inputs, consts, res, guards, on_node or _nothing)
        except GenieError:  # the guards', the checks', a cancellation: already named
            raise
        except Exception as e:
            node = self._failed_node(e)
            op = node.op if node is not None else "genie.program"
            if out_of_memory(e):
                raise RemoteMemoryError(f"{op} could not allocate its memory: {e}") from e
            raise RemoteExecutionError(f"{type(e).__name__}: {e}", op=op,
                                       remote_traceback=traceback.format_exc()) from e

    def _failed_node(self, e: BaseException) -> Node | None:
        tb = e.__traceback__
        found = None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == self.filename:
                found = self.line_node.get(tb.tb_lineno)
            tb = tb.tb_next
        return found


def _bound_sources(graph: Graph) -> list[int]:
    return [n.id for n in graph.nodes if n.op in (CONST, RESIDENT)]


def _nothing(node: Node) -> None:
    return None


__all__ = ["Program"]
