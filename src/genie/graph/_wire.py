"""Graph wire form: a JSON header then raw constant buffers. No pickle.

Layout: ``b"GNG1" | u32 header length | header (UTF-8 JSON) | constant bytes, back to back``.
Values that JSON has no word for are tagged one-key objects: ``{"r": [node, index]}`` for a Ref,
``{"dt": "float32"}``, ``{"dev": "cpu"}``, ``{"mf": ...}``, ``{"ly": ...}``, ``{"c": [re, im]}``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch

from genie._errors import LocalProtocolError, ProtocolError
from genie.graph._ir import Graph, Node, Ref, TensorMeta
from genie.graph._ops import check_op
from genie.transport._tensors import DTYPES

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


def _node_record(n: Node, *, for_digest: bool) -> list:
    rec = [n.op, encode_value(n.args), {k: encode_value(v) for k, v in n.kwargs.items()},
           [encode_meta(m) for m in n.outputs], n.multi, list(n.storages), list(n.writes)]
    if not for_digest:  # where it came from and its seed do not change what it computes
        rec += [n.module, n.seed]
    return rec


def _header(g: Graph, *, for_digest: bool) -> dict:
    return {
        "nodes": [_node_record(n, for_digest=for_digest) for n in g.nodes],
        "outputs": [[r.node, r.index] for r in g.outputs],
    }


def encode_structure(g: Graph) -> bytes:
    return json.dumps(_header(g, for_digest=True), separators=(",", ":")).encode()


def graph_to_bytes(g: Graph, *, with_constants: bool = True) -> bytes:
    header = _header(g, for_digest=False)
    blobs: list[bytes] = []
    if with_constants:
        consts = []
        for digest, t in g.constants.items():
            data = t.detach().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
            consts.append([digest, encode_meta(TensorMeta(tuple(t.shape), (), t.dtype)), len(data)])
            blobs.append(data)
        header["constants"] = consts
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *blobs])


def graph_from_bytes(data: bytes | memoryview, *, max_nodes: int | None = None) -> Graph:
    """The graph in ``data``, checked: ProtocolError when malformed or over ``max_nodes`` nodes,
    UnsupportedOpError when a node names an op that may not run (before anything runs)."""
    data = memoryview(data)
    if bytes(data[:4]) != MAGIC or len(data) < 8:
        raise ProtocolError("not a genie graph: bad magic")
    (hlen,) = struct.unpack("<I", data[4:8])
    if 8 + hlen > len(data):
        raise ProtocolError("genie graph truncated in its header")
    try:
        header = json.loads(bytes(data[8 : 8 + hlen]))
        records = header["nodes"]
        if max_nodes is not None and len(records) > max_nodes:
            raise ProtocolError(f"genie graph of {len(records)} nodes: this server takes at most {max_nodes}")
        nodes = []
        for i, rec in enumerate(records):
            op, args, kwargs, outs, multi, storages, writes, *rest = rec
            module, seed = rest if rest else ("", None)
            nodes.append(Node(i, str(op), tuple(decode_value(args)),
                              {k: decode_value(v) for k, v in kwargs.items()},
                              tuple(decode_meta(m) for m in outs), bool(multi), tuple(storages),
                              tuple(writes), module, seed))
        outputs = [Ref(int(n), int(i)) for n, i in header["outputs"]]
        constants = {}
        pos = 8 + hlen
        for digest, meta, nbytes in header.get("constants", []):
            m = decode_meta(meta)
            if pos + nbytes > len(data):
                raise ProtocolError("genie graph truncated in its constants")
            buf = bytearray(data[pos : pos + nbytes])
            constants[digest] = torch.frombuffer(buf, dtype=torch.uint8).view(m.dtype).reshape(m.shape) \
                if nbytes else torch.empty(m.shape, dtype=m.dtype)
            pos += nbytes
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
    return Graph(nodes, outputs, constants)
