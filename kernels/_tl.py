"""Triton pieces that behave the same compiled and interpreted. Imported by the kernel modules only.

``tl.max`` and ``tl.sum`` are ``@triton.jit`` helpers, bound when ``triton.language`` is imported:
imported without ``TRITON_INTERPRET=1`` they cannot run in the interpreter, imported with it they
cannot be compiled. ``tl.reduce`` is a builtin in both modes, and the interpreter maps these two
combine functions straight to numpy, so kernels reduce with ``tl.reduce(x, axis, MAX)`` and work
whatever the import order. (``tl.zeros``, ``tl.cdiv`` and ``tl.sigmoid`` are jitted too: kernels
use ``tl.full`` and spell the others out.)
"""

import triton.language as tl

MAX = tl.standard._elementwise_max
SUM = tl.standard._sum_combine
