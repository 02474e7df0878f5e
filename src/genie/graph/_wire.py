"""Graph wire form: one JSON header, no constants (they travel as transport buffers). No pickle.

Layout: ``b"GNG1" | u32 header length | header (UTF-8 JSON)``; the header is
``{"nodes": [record, ...], "outputs": [[node, index], ...]}`` and a node record is::

    [op, args, kwargs, outputs, multi, storages, writes, module, seed]

with each output ``[shape, stride, dtype, offset]``. Values that JSON has no word for are tagged
one-key objects: ``{"r": [node, index]}`` for a Ref, ``{"dt": "float32"}``, ``{"dev": "cpu"}``,
``{"mf": ...}``, ``{"ly": ...}``, ``{"c": [re, im]}``, ``{"d": {...}}``.

One codec: ``NodeWriter`` writes records (as plain text, or with a hole for every int that is not a
Ref and every constant's digest: ``graph._template``'s skeletons), and ``node_from_record`` reads one.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch

from genie._dtypes import DTYPE_NAMES, DTYPES
from genie._errors import LocalProtocolError, ProtocolError
from genie.graph._ir import CONST, Graph, Node, Ref, TensorMeta
from genie.graph._ops import check_enum_args, check_op

MAGIC = b"GNG1"
_ENUM_TAG = {torch.dtype: "dt", torch.memory_format: "mf", torch.layout: "ly"}
# What each enum tag may name. Dtypes are the wire's plain ones (a quantized dtype cannot be
# rebuilt from bytes); sparse and other layouts have no wire form either.
_ENUMS: dict[str, dict[str, object]] = {
    "dt": dict(DTYPES),
    "mf": {str(v).removeprefix("torch."): v for v in vars(torch).values()
           if isinstance(v, torch.memory_format)},
    "ly": {"strided": torch.strided},
}


def _enum_name(tag: str, v: object) -> str:
    name = str(v).removeprefix("torch.")
    if name not in _ENUMS[tag]:
        raise LocalProtocolError(f"{v} cannot go in a genie graph: only plain dtypes and strided "
                                 "layouts have a wire form")
    return name


def encode_value(v: Any) -> Any:
    t = type(v)
    if t is Ref:
        return {"r": [v.node, v.index]}
    if t in (int, float, bool, str) or v is None:
        return v
    if t in (list, tuple, torch.Size):
        return [encode_value(x) for x in v]
    if t in _ENUM_TAG:
        tag = _ENUM_TAG[t]
        return {tag: _enum_name(tag, v)}
    if t is torch.device:
        return {"dev": str(v)}
    if t is complex:
        return {"c": [v.real, v.imag]}
    if t is dict:
        return {"d": {k: encode_value(x) for k, x in v.items()}}
    raise TypeError(f"cannot put a {t.__name__} value in a genie graph: {v!r}")


def decode_value(v: Any) -> Any:
    if type(v) is list:
        return [decode_value(x) for x in v]
    if type(v) is not dict:
        return v
    (tag, x), = v.items()
    if tag == "r":
        return Ref(int(x[0]), int(x[1]))
    if tag in _ENUMS:
        value = _ENUMS[tag].get(x) if type(x) is str else None
        if value is None:
            raise ProtocolError(f"{x!r:.40} is not a {tag!r} value genie graphs carry")
        return value
    if tag == "dev":
        return torch.device(x)
    if tag == "c":
        return complex(x[0], x[1])
    if tag == "d":
        return {k: decode_value(y) for k, y in x.items()}
    raise ProtocolError(f"unknown value tag {tag!r} in graph")


def encode_meta(m: TensorMeta) -> list:
    return [list(m.shape), list(m.stride), _enum_name("dt", m.dtype), m.offset]


def decode_meta(x: list) -> TensorMeta:
    shape, stride, dtype, offset = x
    dt = DTYPES.get(dtype) if type(dtype) is str else None
    if dt is None:
        raise ProtocolError(f"dtype {dtype!r:.40} in graph: not a plain dtype that travels as bytes")
    return TensorMeta(tuple(shape), tuple(stride), dt, offset)


INT_HOLE = json.dumps("\x00genie:int\x00")
STR_HOLE = json.dumps("\x00genie:str\x00")
_STRING = json.encoder.encode_basestring_ascii  # the C encoder json.dumps uses
_LITERAL = {True: "true", False: "false", None: "null"}


def _abstract(v: Any, ints: list[int]) -> Any:
    """The wire encoding ``v`` with every int (not in a Ref) replaced by a hole."""
    t = type(v)
    if t is int:
        ints.append(v)
        return json.loads(INT_HOLE)
    if t is list:
        return [_abstract(x, ints) for x in v]
    if t is dict:
        if "r" in v and len(v) == 1:  # a Ref is wiring, not a size: it stays in the skeleton
            return v
        return {k: _abstract(x, ints) for k, x in v.items()}
    return v


class NodeWriter:
    """Writes node records as compact JSON text, in one pass (a hot path: a decode step writes a
    graph of ~1000 nodes; building the records as objects first cost 3x more).

    With ``holes``, every int that does not name a Ref (sizes, strides, storage ids, seeds) and
    every constant's digest is written as a hole, its value appended to ``ints`` or ``strs``: the
    text is then a template's skeleton. ``provenance=False`` leaves out what does not change what a
    node computes (its module path and seed): the text a structural digest is taken of."""

    def __init__(self, *, holes: bool = True, provenance: bool = True) -> None:
        self.out: list[str] = []
        self.ints: list[int] = []
        self.strs: list[str] = []
        self.holes = holes
        self.provenance = provenance

    def text(self) -> str:
        return "".join(self.out)

    def int(self, v: int) -> None:
        if self.holes:
            self.ints.append(v)
            self.out.append(INT_HOLE)
        else:
            self.out.append(str(v))

    def ints_list(self, xs) -> None:
        if self.holes:
            self.ints.extend(xs)
            self.out.append("[" + ",".join([INT_HOLE] * len(xs)) + "]")
        else:
            self.out.append("[" + ",".join(map(str, xs)) + "]")

    def value(self, v: Any) -> None:
        t, out = type(v), self.out
        if t is Ref:
            out.append(f'{{"r":[{v.node},{v.index}]}}')
        elif t is int:
            self.int(v)
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
            enc = encode_value(v)
            if self.holes:
                enc = _abstract(enc, self.ints)
            out.append(json.dumps(enc, separators=(",", ":")))

    def node(self, n: Node) -> None:
        out = self.out
        out.append("[" + _STRING(n.op) + ",")
        if n.op == CONST and self.holes:
            self.strs.append(n.args[0])
            out.append("[" + STR_HOLE + "]")
        else:
            self.value(n.args)
        out.append(",{")
        for i, (k, v) in enumerate(n.kwargs.items()):
            out.append(("," if i else "") + _STRING(k) + ":")
            self.value(v)
        out.append("},[")
        for i, m in enumerate(n.outputs):
            out.append(",[" if i else "[")
            self.ints_list(m.shape)
            out.append(",")
            self.ints_list(m.stride)
            name = DTYPE_NAMES.get(m.dtype)
            if name is None:
                raise LocalProtocolError(f"{m.dtype} cannot go in a genie graph: only plain dtypes "
                                         "have a wire form")
            out.append(f',"{name}",')
            self.int(m.offset)
            out.append("]")
        out.append("]," + _LITERAL[bool(n.multi)] + ",")
        self.ints_list(n.storages)
        out.append(",")
        self.ints_list(n.writes)
        if self.provenance:
            out.append("," + _STRING(n.module) + ",")
            self.value(n.seed)
        out.append("]")

    def graph(self, g: Graph) -> None:
        """``g``'s whole header: its nodes, then its outputs."""
        out = self.out
        out.append('{"nodes":[')
        for i, n in enumerate(g.nodes):
            if i:
                out.append(",")
            self.node(n)
        out.append(outputs_tail(g.outputs))


def outputs_tail(outputs: list[Ref]) -> str:
    """The header's text after the last node record."""
    return '],"outputs":[' + ",".join(f"[{r.node},{r.index}]" for r in outputs) + "]}"


def node_from_record(i: int, rec: Any) -> Node:
    """Node ``i`` from its decoded JSON record; TypeError, ValueError or ProtocolError if malformed."""
    op, args, kwargs, outs, multi, storages, writes, *rest = rec
    module, seed = rest if rest else ("", None)
    node = Node(i, str(op), tuple(decode_value(args)), {k: decode_value(v) for k, v in kwargs.items()},
                tuple(decode_meta(m) for m in outs), bool(multi), tuple(storages), tuple(writes),
                module, seed)
    check_enum_args(node.op, node.args, node.kwargs)  # torch would bind a bare int there, unchecked
    return node


def encode_structure(g: Graph) -> bytes:
    """The text a graph's structural digest is taken of (no module paths, no seeds)."""
    w = NodeWriter(holes=False, provenance=False)
    w.graph(g)
    return w.text().encode()


def graph_to_bytes(g: Graph) -> bytes:
    w = NodeWriter(holes=False)
    w.graph(g)
    return frame_header(w.text().encode())


def frame_header(head: bytes) -> bytes:
    return MAGIC + struct.pack("<I", len(head)) + head


def graph_from_bytes(data: bytes | memoryview, *, max_nodes: int | None = None) -> Graph:
    """The graph in ``data``, checked: ProtocolError when malformed or over ``max_nodes`` nodes,
    UnsupportedOpError when a node names an op that may not run (before anything runs)."""
    data = memoryview(data)
    if bytes(data[:4]) != MAGIC or len(data) < 8:
        raise ProtocolError("not a genie graph: bad magic")
    (hlen,) = struct.unpack("<I", data[4:8])
    if 8 + hlen != len(data):
        raise ProtocolError(f"genie graph of {len(data)} bytes with a header of {hlen}")
    try:
        header = json.loads(bytes(data[8:]))
        records = header["nodes"]
        if max_nodes is not None and len(records) > max_nodes:
            raise ProtocolError(f"genie graph of {len(records)} nodes: this server takes at most {max_nodes}")
        nodes = [node_from_record(i, rec) for i, rec in enumerate(records)]
        outputs = [Ref(int(n), int(i)) for n, i in header["outputs"]]
    except ProtocolError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, OverflowError) as e:
        raise ProtocolError(f"malformed genie graph: {e}") from e
    for op in {n.op for n in nodes}:
        check_op(op)
    for n in nodes:
        for r in n.refs():
            if not (0 <= r.node < n.id) or r.index >= len(nodes[r.node].outputs):
                raise ProtocolError(f"node {n.id} refers to {r!r}, which does not precede it")
    return Graph(nodes, outputs)
