"""A Graph as a torch.fx.GraphModule: placeholders for inputs, buffers for constants."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from genie.graph._ir import CONST, INPUT, RESIDENT, Graph, Ref, map_refs
from genie.graph._ops import resolve_op


def graph_to_fx(g: Graph) -> fx.GraphModule:
    root = torch.nn.Module()
    fg = fx.Graph()
    values: dict[tuple[int, int], fx.Node] = {}
    by_pos = {g.nodes[nid].args[0]: nid for nid in g.inputs}
    for pos in sorted(by_pos):  # placeholders must come first, in input order
        values[(by_pos[pos], 0)] = fg.placeholder(f"input_{pos}")
    for n in g.nodes:
        if n.op == INPUT:
            continue
        if n.op == RESIDENT:
            raise NotImplementedError(
                "to_fx of a graph that reads server-resident values: capture it in one piece")
        if n.op == CONST:
            name = f"const_{n.args[0][:16]}"
            if not hasattr(root, name):
                root.register_buffer(name, g.constants[n.args[0]])
            values[(n.id, 0)] = fg.get_attr(name)
            continue
        look = lambda r: values[(r.node, r.index)]  # noqa: B023 (used at once)
        kwargs = {k: map_refs(v, look) for k, v in n.kwargs.items()}
        if isinstance(kwargs.get("device"), torch.device) and kwargs["device"].type != "cpu":
            kwargs["device"] = torch.device("cpu")  # the module runs where its inputs are: here
        out = fg.call_function(resolve_op(n.op), map_refs(tuple(n.args), look), kwargs)
        if n.multi:
            for i in range(len(n.outputs)):
                values[(n.id, i)] = fg.call_function(operator.getitem, (out, i))
        else:
            values[(n.id, 0)] = out
    outs = [values[(r.node, r.index)] for r in g.outputs]
    fg.output(outs[0] if len(outs) == 1 else tuple(outs))
    return fx.GraphModule(root, fg)


__all__ = ["graph_to_fx", "Ref"]
