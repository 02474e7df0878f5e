"""The fused-op table the server's executor uses: name -> (launcher, reference).

The executor calls ``FUSED_OPS[name].launcher(*args, **kwargs)`` on CUDA and ``.reference`` on any
other device; both take the public function's arguments and check them the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ._attention import attention_reference, attention_triton
from ._conv import conv2d_bn_act_reference, conv2d_bn_act_triton
from ._decode import decode_attention_reference, decode_attention_triton


class FusedOp(NamedTuple):
    launcher: Callable[..., torch.Tensor]  # the Triton kernel (interpreted when not on CUDA)
    reference: Callable[..., torch.Tensor]  # the same computation in torch ops


FUSED_OPS: dict[str, FusedOp] = {
    "genie.attention": FusedOp(attention_triton, attention_reference),
    "genie.decode_attention": FusedOp(decode_attention_triton, decode_attention_reference),
    "genie.conv2d_bn_act": FusedOp(conv2d_bn_act_triton, conv2d_bn_act_reference),
}
