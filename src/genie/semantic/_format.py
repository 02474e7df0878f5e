"""``print(plan)``: a readable plan, one line per stage and per transfer."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from genie.graph import Ref
from genie.semantic._plan import Residency

if TYPE_CHECKING:
    from genie.semantic._plan import ExecutionPlan


def nbytes(n: float) -> str:
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def flops(n: float) -> str:
    for unit, div in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} FLOP"


def _arg(v: object) -> str:
    if type(v) is Ref:
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_arg(x) for x in v) + ")"
    if isinstance(v, float):
        return f"{v:.4g}"
    return repr(v)


def format_plan(plan: ExecutionPlan) -> str:
    g = plan.graph
    fused = Counter(grp.kind for grp in plan.fusion_groups)
    phase = f"/{plan.phase}" if plan.phase.value != "none" else ""
    lines = [
        f"ExecutionPlan {plan.key[:12]}  {plan.workload}{phase}  "
        f"{len(plan.node_map)} -> {len(g.nodes)} nodes, "
        f"{len(plan.stages)} stages, fused: "
        + (", ".join(f"{k} x{n}" for k, n in fused.items()) or "none")]
    by_node = {grp.node: grp for grp in plan.fusion_groups}
    for s in plan.stages:
        ups = [f"input {p}" for p in s.uploads]
        if s.weights:
            ups.append(f"{len(s.weights)} weights")
        head = (f"  stage {s.index} [{s.name}]  %{s.first}..%{s.last}  {flops(s.flops)}, {nbytes(s.bytes)}"
                + (f"  waits for: {', '.join(ups)}" if s.uploads else "")
                + (f"  (+{len(s.weights)} weights)" if s.weights and not s.uploads else ""))
        lines.append(head)
        for nid in s.fused:
            n, grp = g.nodes[nid], by_node.get(nid)
            args = ", ".join([_arg(a) for a in n.args] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()])
            src = f"  <- {len(grp.nodes)} nodes %{grp.nodes[0]}..%{grp.nodes[-1]}" if grp else ""
            lines.append(f"      %{nid} = {n.op}({args}){src}")
        sends = [f"output {i}" for i in s.ready_outputs if i not in s.keep_outputs]
        keeps = [f"output {i}" for i in s.keep_outputs]
        if sends or keeps:
            lines.append("      then " + "; ".join(
                ([f"download {', '.join(sends)}"] if sends else []) + ([f"keep {', '.join(keeps)} resident"]
                                                                      if keeps else [])))
    inputs = [t for t in plan.uploads if not t.pinned]
    lines.append("  uploads, in first-use order: " + (", ".join(
        f"{t.what} ({nbytes(t.nbytes)}{', streamed' if t.key in plan.stream else ''}) -> stage {t.stage}"
        for t in inputs) or "none")
        + f"; weights: {sum(t.pinned for t in plan.uploads)} pinned, {nbytes(plan.weight_bytes)}")
    lines.append("  downloads, as they become ready: " + (", ".join(
        f"{t.what} ({nbytes(t.nbytes)}) after stage {t.stage}" for t in plan.downloads) or "none"))
    count = Counter(plan.residency.values())
    lines.append("  residency: " + ", ".join(f"{r} x{count[r]}" for r in Residency if count[r])
                 + f"; activations peak {nbytes(plan.peak_bytes)} of {nbytes(plan.activation_bytes)}")
    for kind, root, why in plan.unfused:
        lines.append(f"  not fused: {kind} at %{root}: {why}")
    return "\n".join(lines)
