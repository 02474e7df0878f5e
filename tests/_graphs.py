"""Graphs written by hand, node by node, as a (possibly hostile) client sends them."""

from __future__ import annotations

import torch

from genie.graph import Node, TensorMeta

F32 = torch.float32


def meta(*shape: int, dtype: torch.dtype = F32) -> TensorMeta:
    """A contiguous tensor's metadata."""
    stride, acc = [], 1
    for s in reversed(shape):
        stride.insert(0, acc)
        acc *= s
    return TensorMeta(tuple(shape), tuple(stride), dtype)


def node(i: int, op: str, *args, outputs=(), multi=False, **kwargs) -> Node:
    """A node as a client writes it: no storages, no declared writes."""
    return Node(i, op, args, kwargs, tuple(outputs), multi)
