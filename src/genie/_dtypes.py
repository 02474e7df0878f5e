"""The dtypes that travel as raw bytes, by short name: the graph IR's wire form and the transport's
tensor buffers both speak them, so they live below both.

Plain numbers only, which ``frombuffer`` rebuilds with no quantizer or packing (a quantized dtype
crashes the receiver) and ``view(uint8)`` flattens. A name outside this table is a protocol error,
never a getattr. Names are looked up on ``torch`` because older torches lack some float8 ones.
"""

from __future__ import annotations

import torch

_WIRE_DTYPES = (
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
)
DTYPES: dict[str, torch.dtype] = {
    name: dt for name in _WIRE_DTYPES if isinstance(dt := getattr(torch, name, None), torch.dtype)
}
DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in DTYPES.items()}
