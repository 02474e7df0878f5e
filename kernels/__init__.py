"""Triton kernels for Genie's fused ops, each with a torch reference. Imports nothing else from genie,
and nothing from triton until a kernel first runs on the Triton path."""

from ._attention import attention, attention_reference
from ._conv import conv2d_bn_act, conv2d_bn_act_reference, fold_batchnorm
from ._decode import decode_attention, decode_attention_reference
from ._ops import FUSED_OPS, FusedOp

__all__ = [
    "FUSED_OPS",
    "FusedOp",
    "attention",
    "attention_reference",
    "conv2d_bn_act",
    "conv2d_bn_act_reference",
    "decode_attention",
    "decode_attention_reference",
    "fold_batchnorm",
]
