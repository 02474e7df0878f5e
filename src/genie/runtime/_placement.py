"""Which server of a set runs each node of a graph, and the graph cut into one-server pieces.

A node's server is its device's index: a factory's or a ``.to()``'s ``device`` argument, a resident
value's handle (``handle >> shift``), else the server of the first value it reads (the recorder
refuses ops that mix devices, so that is every value it reads, except a ``.to()`` that moves one).
CONST and INPUT nodes have none: each piece that reads one sends it to its own server. An op that
reads only those runs on server 0: a tensor sent to another device is never a bare constant (the
recorder keeps it an empty on that device and a copy into it), so such constants are device 0's.

Pieces are maximal runs of consecutive ops, in program order, on one server: running them in
order keeps program order, so in-place writes and views stay right by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from genie.graph import CONST, INPUT, RESIDENT, Graph, Ref

UNPLACED = -1


def server_of(device: object) -> int | None:
    """The server index a device argument names (``remote_accelerator:i`` -> i), else None."""
    if not isinstance(device, (torch.device, str)):
        return None
    try:
        d = torch.device(device)
    except RuntimeError:
        return None
    return (d.index or 0) if d.type == torch._C._get_privateuse1_backend_name() else None


def placement(graph: Graph, shift: int) -> list[int]:
    """The server of each node (UNPLACED for CONST and INPUT nodes)."""
    place = [UNPLACED] * len(graph.nodes)
    for n in graph.nodes:
        if n.op == RESIDENT:
            place[n.id] = n.args[0] >> shift
        elif n.op in (CONST, INPUT):
            continue
        else:
            s = server_of(n.kwargs.get("device")) if n.kwargs else None
            if s is None:
                s = next((place[r.node] for r in n.refs() if place[r.node] != UNPLACED), None)
            place[n.id] = 0 if s is None else s
    return place


def servers_used(graph: Graph, place: list[int]) -> set[int]:
    return {p for p in place if p != UNPLACED}


@dataclass
class Piece:
    """Consecutive ops of one server; ``hands``: values it keeps for later pieces or the caller."""

    server: int
    nodes: list[int] = field(default_factory=list)
    hands: list[Ref] = field(default_factory=list)


def cut(graph: Graph, place: list[int]) -> tuple[list[Piece], dict[int, int]]:
    """The pieces, in order, and the piece of each op node."""
    pieces: list[Piece] = []
    piece_of: dict[int, int] = {}
    for n in graph.nodes:
        if n.op in (CONST, INPUT, RESIDENT):
            continue
        if not pieces or pieces[-1].server != place[n.id]:
            pieces.append(Piece(place[n.id]))
        pieces[-1].nodes.append(n.id)
        piece_of[n.id] = len(pieces) - 1
    for k, p in enumerate(pieces):  # what each piece reads from another piece, it is handed
        for nid in p.nodes:
            for r in graph.nodes[nid].refs():
                owner = piece_of.get(r.node)
                if owner is not None and owner != k and r not in pieces[owner].hands:
                    pieces[owner].hands.append(r)
    return pieces, piece_of
