"""A graph with its sizes abstracted: a template, plus the vectors of ints and strings that fill it.

A decode loop whose KV cache grows records a new graph every step, equal to the last one except for
sizes (shapes, strides, view arguments), the digest of the new token's constant, the handles of the
resident cache and the random seeds. ``split`` cuts a graph's wire header into

- ``skeleton``: the JSON text with a hole for every int (except those naming a Ref) and for every
  constant's digest; its ``digest`` keys the template;
- ``ints``: the values of the int holes, in text order (int64); ``strs``: the digests.

``Template(skeleton).fill(ints, strs)`` rebuilds the very graph: the text is spliced back together
and parsed by ``Graph.from_bytes``, so a filled template is checked like any graph off the wire.

Between two uses of one template most ints do not change, and those that do mostly move by the same
step as last time (a sequence length grows by one each step). ``predict`` extrapolates linearly from
the last two vectors, and only the ints that break the prediction travel: ``corrections``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from genie._errors import ProtocolError
from genie.graph._ir import RESIDENT, Graph, Node, Ref
from genie.graph._wire import NodeWriter, frame_header, node_from_record

_HOLE = re.compile(r'"\\u0000genie:(int|str)\\u0000"')


@dataclass(frozen=True, slots=True)
class Split:
    skeleton: str
    digest: str
    ints: np.ndarray  # int64
    strs: list[str]


def split(graph: Graph) -> Split | None:
    """The template of ``graph`` and its vectors; None if an int does not fit in int64.

    Remembered on the graph (a graph is not changed once built): ``genie.compile`` hands over a
    replayed graph with its split already made (``with_split``), so a replay never re-emits it."""
    known = graph.__dict__.get("_split")
    if known is not None:
        return known
    parts = _split(graph)
    graph.__dict__["_split"] = parts
    return parts


def with_split(graph: Graph, parts: Split) -> Graph:
    """``graph``, with ``parts`` as its split (the caller vouches that they agree)."""
    graph.__dict__["_split"] = parts
    return graph


def _split(graph: Graph) -> Split | None:
    e = NodeWriter()
    e.graph(graph)
    skeleton = e.text()
    try:
        ints = np.array(e.ints, dtype=np.int64)
    except OverflowError:
        return None
    digest = hashlib.blake2b(skeleton.encode(), digest_size=16).hexdigest()
    return Split(skeleton, digest, ints, e.strs)


class Template:
    """A skeleton cut at its holes, ready to be filled many times.

    The first fill parses the whole text, through ``Graph.from_bytes`` and its checks. Later fills
    rebuild only the nodes with a hole that changed since the last fill and share the rest with the
    last graph: a decode step changes the sizes of about a third of its nodes.
    """

    def __init__(self, skeleton: str) -> None:
        self.digest = hashlib.blake2b(skeleton.encode(), digest_size=16).hexdigest()
        self._text = _HOLE.split(skeleton)
        try:
            header = json.loads(skeleton)
            self._outputs = [Ref(int(n), int(i)) for n, i in header["outputs"]]
            records = header["nodes"]
        except (ValueError, KeyError, TypeError) as e:
            raise ProtocolError(f"malformed plan template: {e}") from e
        self._records: list[tuple[list[str], list[str]]] = []
        int_nodes: list[int] = []
        self._str_nodes: list[int] = []
        self._first: list[tuple[int, int]] = []  # per node: the index of its first int and str hole
        for i, rec in enumerate(records):
            parts = _HOLE.split(json.dumps(rec, separators=(",", ":")))
            kinds = parts[1::2]
            self._records.append((parts[0::2], kinds))
            self._first.append((len(int_nodes), len(self._str_nodes)))
            for k in kinds:
                (int_nodes if k == "int" else self._str_nodes).append(i)
        self._int_nodes = np.array(int_nodes, dtype=np.int64)
        self.n_ints, self.n_strs = len(int_nodes), len(self._str_nodes)
        self._last: tuple[np.ndarray, list[str], Graph] | None = None
        self.shared: dict = {}  # structural analyses of its graphs (``Graph.structural``)

    def fill(self, ints: np.ndarray, strs: list[str]) -> Graph:
        if len(ints) != self.n_ints or len(strs) != self.n_strs:
            raise ProtocolError(f"template takes {self.n_ints} ints and {self.n_strs} strings, "
                                f"got {len(ints)} and {len(strs)}")
        last = self._last
        if last is None:
            graph = self._parse(ints, strs)
        else:
            last_ints, last_strs, last_graph = last
            changed = set(self._int_nodes[np.flatnonzero(ints != last_ints)].tolist())
            changed.update(self._str_nodes[i] for i, (a, b) in enumerate(zip(strs, last_strs, strict=True))
                           if a != b)
            if not changed:
                return last_graph
            nodes = list(last_graph.nodes)
            ints_list = ints.tolist()
            for i in changed:
                nodes[i] = self._node(i, ints_list, strs)
            graph = Graph(nodes, list(self._outputs))
        graph.shared = self.shared  # the skeleton (ops, refs) is this template's: so is the structure
        self._last = (ints.copy(), list(strs), graph)
        return graph

    def program_ints(self, ints: np.ndarray, graph: Graph) -> bytes:
        """``ints`` (a fill of this template, ``graph``) without the handles of the resident values it
        reads: two fills that differ only there are one program on other values."""
        holes = self.shared.get("resident holes")
        if holes is None:
            holes = self.shared["resident holes"] = np.array(
                [self._first[n.id][0] for n in graph.nodes if n.op == RESIDENT and self._records[n.id][1]
                 and self._records[n.id][1][0] == "int"], dtype=np.int64)
        if not len(holes):
            return ints.tobytes()
        masked = ints.copy()
        masked[holes] = 0
        return masked.tobytes()

    def _parse(self, ints: np.ndarray, strs: list[str]) -> Graph:
        values = iter(ints.tolist())
        texts = iter(strs)
        segs, kinds = self._text[0::2], self._text[1::2]
        out = [segs[0]]
        for kind, seg in zip(kinds, segs[1:], strict=True):
            out.append(str(next(values)) if kind == "int" else json.dumps(next(texts)))
            out.append(seg)
        return Graph.from_bytes(frame_header("".join(out).encode()))

    def _node(self, i: int, ints: list[int], strs: list[str]) -> Node:
        """Node ``i`` alone; its wiring comes from the skeleton, which the first fill checked."""
        segs, kinds = self._records[i]
        ii, si = self._first[i]
        out = [segs[0]]
        for kind, seg in zip(kinds, segs[1:], strict=True):
            if kind == "int":
                out.append(str(ints[ii]))
                ii += 1
            else:
                out.append(json.dumps(strs[si]))
                si += 1
            out.append(seg)
        try:
            return node_from_record(i, json.loads("".join(out)))
        except ProtocolError:
            raise
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ProtocolError(f"malformed plan template node {i}: {e}") from e


SMALL_FIX = 64  # this many corrections or fewer travel in the run's header, as JSON lists


def small_corrections(actual: list[int], last: list[int], prev: list[int]) -> tuple[list[int], list[int]]:
    """``corrections(actual, predict(last, prev))`` on short Python lists: a numpy call costs more
    than the whole vector of a small graph. Exact integers: where int64 would wrap, the prediction
    simply misses and the value travels, and ``apply`` agrees on every position that does not."""
    idx = [i for i, (a, b, c) in enumerate(zip(actual, last, prev, strict=True)) if a != 2 * b - c]
    return idx, [actual[i] for i in idx]


def fix_lists(fix: list[list[int]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """A run header's ``fix`` ([positions, values], lists of ints: the protocol checked that much) as
    ``apply``'s arrays, for a vector of ``n``; ProtocolError unless their lengths fit (positions are
    range-checked by ``apply``)."""
    positions, values = fix
    if not len(positions) == len(values) <= min(n, SMALL_FIX):
        raise ProtocolError("run message: bad corrections")
    try:
        return np.array(positions, dtype=np.int64), np.array(values, dtype=np.int64)
    except OverflowError:
        raise ProtocolError("run message: a correction does not fit in int64") from None


def predict(last: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """Linear extrapolation from the last two vectors (int64 arithmetic wraps alike on both ends)."""
    with np.errstate(over="ignore"):
        return 2 * last - prev


def corrections(actual: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions, values) where ``actual`` breaks the prediction."""
    idx = np.flatnonzero(actual != predicted).astype(np.int32)
    return idx, actual[idx]


def apply(predicted: np.ndarray, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(predicted)):
        raise ProtocolError("template correction out of range")
    out = predicted.copy()
    out[idx] = values
    return out
