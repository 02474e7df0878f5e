"""Constant folding of small, data-independent values (masks, scales) at analysis time.

A causal mask is built from ``ones``/``arange``/``tril``/``where``: it depends on no input, so its
value is known from the graph alone. Evaluating it on the CPU tells "causal" from "some other
mask" for every way a model may build one, without one pattern per builder.
"""

from __future__ import annotations

import torch

from genie.graph import CONST, INPUT, RESIDENT, Graph, Ref, map_refs, resolve_op

MAX_NUMEL = 1 << 22  # a 2048 x 2048 mask; larger ones are not folded (the group stays unfused)
_NOT = object()


class Folder:
    """Folds values of one graph, memoised (a mask shared by every layer is folded once)."""

    def __init__(self, graph: Graph, max_numel: int = MAX_NUMEL) -> None:
        self.graph = graph
        self.max_numel = max_numel
        self._memo: dict[int, object] = {}

    def value(self, ref: Ref) -> torch.Tensor | None:
        """The CPU value of ``ref``, or None when it depends on data, randomness or is too big."""
        v = self._node(ref.node)
        if v is _NOT:
            return None
        if self.graph.nodes[ref.node].multi:
            return v[ref.index]  # type: ignore[index]
        return v  # type: ignore[return-value]

    def scalar(self, v: object) -> float | None:
        """A Python number, or a folded 0-d / one-element tensor, as a float."""
        if isinstance(v, bool):
            return None
        if isinstance(v, (int, float)):
            return float(v)
        if type(v) is Ref:
            t = self.value(v)
            if t is not None and t.numel() == 1:
                return float(t.reshape(()).item())
        return None

    def _node(self, nid: int) -> object:
        hit = self._memo.get(nid, None)
        if hit is not None:
            return hit
        self._memo[nid] = _NOT  # cycles cannot happen; this also caps re-entry
        out = self._eval(nid)
        self._memo[nid] = out
        return out

    def _eval(self, nid: int) -> object:
        n = self.graph.nodes[nid]
        if n.op in (INPUT, RESIDENT) or n.seed is not None or n.writes or not n.outputs:
            return _NOT
        if any(m.numel > self.max_numel for m in n.outputs):
            return _NOT
        if n.op == CONST:
            t = self.graph.constants.get(n.args[0])
            return _NOT if t is None else t
        if n.op.startswith("genie."):
            return _NOT
        for r in n.refs():
            if self._node(r.node) is _NOT:
                return _NOT
        get = lambda r: self.value(r)
        args = map_refs(n.args, get)
        kwargs = {k: map_refs(v, get) for k, v in n.kwargs.items()}
        if "device" in kwargs:
            kwargs["device"] = torch.device("cpu")
        kwargs.pop("pin_memory", None)
        try:
            return resolve_op(n.op)(*args, **kwargs)
        except Exception:  # analysis must never fail on a value it merely wanted to know
            return _NOT
