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
import struct
from dataclasses import dataclass

import numpy as np
import torch

from genie._errors import ProtocolError
from genie.graph._ir import CONST, Graph, Node, Ref
from genie.graph._wire import MAGIC, encode_value

_INT = "\x00genie:int\x00"
_STR = "\x00genie:str\x00"
_HOLE = re.compile(r'"\\u0000genie:(int|str)\\u0000"')


@dataclass(frozen=True, slots=True)
class Split:
    skeleton: str
    digest: str
    ints: np.ndarray  # int64
    strs: list[str]


def _abstract(v, ints: list[int]):
    """The wire encoding ``v`` with every int (not in a Ref) replaced by a hole."""
    t = type(v)
    if t is int:
        ints.append(v)
        return _INT
    if t is list:
        return [_abstract(x, ints) for x in v]
    if t is dict:
        if "r" in v and len(v) == 1:  # a Ref is wiring, not a size: it stays in the skeleton
            return v
        return {k: _abstract(x, ints) for k, x in v.items()}
    return v


_INT_HOLE = json.dumps(_INT)
_STR_HOLE = json.dumps(_STR)
_STRING = json.encoder.encode_basestring_ascii  # the C encoder json.dumps uses
_LITERAL = {True: "true", False: "false", None: "null"}


class _Emitter:
    """Writes a graph's wire header as JSON text with holes, in one pass (a hot path: a decode step
    splits a graph of ~1000 nodes; building the header as objects first cost 3x more)."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.ints: list[int] = []
        self.strs: list[str] = []

    def value(self, v) -> None:
        t, out = type(v), self.out
        if t is Ref:
            out.append(f'{{"r":[{v.node},{v.index}]}}')
        elif t is int:
            self.ints.append(v)
            out.append(_INT_HOLE)
        elif t is str:
            out.append(_STRING(v))
        elif t is bool or v is None:
            out.append(_LITERAL[v])
        elif t is list or t is tuple or t is torch.Size:
            out.append("[")
            for i, x in enumerate(v):
                if i:
                    out.append(",")
                self.value(x)
            out.append("]")
        else:  # dtypes, devices, floats, ...: the wire's own encoding, ints abstracted the same way
            out.append(json.dumps(_abstract(encode_value(v), self.ints), separators=(",", ":")))

    def ints_list(self, xs) -> None:
        self.ints.extend(xs)
        self.out.append("[" + ",".join([_INT_HOLE] * len(xs)) + "]")

    def node(self, n: Node) -> None:
        out = self.out
        out.append("[" + _STRING(n.op) + ",")
        if n.op == CONST:
            self.strs.append(n.args[0])
            out.append("[" + _STR_HOLE + "]")
        else:
            self.value(n.args)
        out.append(",{")
        for i, (k, v) in enumerate(n.kwargs.items()):
            out.append(("," if i else "") + _STRING(k) + ":")
            self.value(v)
        out.append("},[")
        for i, m in enumerate(n.outputs):
            out.append("," if i else "")
            out.append("[")
            self.ints_list(m.shape)
            out.append(",")
            self.ints_list(m.stride)
            out.append(f',"{str(m.dtype).removeprefix("torch.")}",{_INT_HOLE}]')
            self.ints.append(m.offset)
        out.append("]," + _LITERAL[bool(n.multi)] + ",")
        self.ints_list(n.storages)
        out.append(",")
        self.ints_list(n.writes)
        out.append("," + _STRING(n.module) + ",")
        self.value(n.seed)
        out.append("]")


def split(graph: Graph) -> Split | None:
    """The template of ``graph`` and its vectors; None if an int does not fit in int64."""
    e = _Emitter()
    e.out.append('{"nodes":[')
    for i, n in enumerate(graph.nodes):
        if i:
            e.out.append(",")
        e.node(n)
    e.out.append('],"outputs":[' + ",".join(f"[{r.node},{r.index}]" for r in graph.outputs) + "]}")
    skeleton = "".join(e.out)
    try:
        ints = np.array(e.ints, dtype=np.int64)
    except OverflowError:
        return None
    digest = hashlib.blake2b(skeleton.encode(), digest_size=16).hexdigest()
    return Split(skeleton, digest, ints, e.strs)


class Template:
    """A skeleton cut at its holes, ready to be filled many times."""

    def __init__(self, skeleton: str) -> None:
        parts = _HOLE.split(skeleton)
        self.segments: list[str] = parts[0::2]
        self.kinds: list[str] = parts[1::2]
        self.n_ints = self.kinds.count("int")
        self.n_strs = len(self.kinds) - self.n_ints
        self.digest = hashlib.blake2b(skeleton.encode(), digest_size=16).hexdigest()

    def fill(self, ints: np.ndarray, strs: list[str]) -> Graph:
        if len(ints) != self.n_ints or len(strs) != self.n_strs:
            raise ProtocolError(f"template takes {self.n_ints} ints and {self.n_strs} strings, "
                                f"got {len(ints)} and {len(strs)}")
        int_iter = iter(ints.tolist())
        str_iter = iter(strs)
        out = [self.segments[0]]
        for kind, seg in zip(self.kinds, self.segments[1:], strict=True):
            out.append(str(next(int_iter)) if kind == "int" else json.dumps(next(str_iter)))
            out.append(seg)
        head = "".join(out).encode()
        return Graph.from_bytes(MAGIC + struct.pack("<I", len(head)) + head)


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
