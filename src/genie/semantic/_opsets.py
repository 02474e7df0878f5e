"""Named sets of aten op names, shared by the pattern table, the cost model and the scheduler."""

from __future__ import annotations


def op_name(name: str) -> str:
    """The one op-name normalizer: ``"mul.Tensor"`` -> ``"aten.mul.Tensor"``; a name with two dots,
    or already in a namespace (``genie.attention``), is kept as given."""
    return name if name.count(".") >= 2 or name.startswith(("genie.", "aten.", "prims.")) else f"aten.{name}"


def ops(*names: str) -> frozenset[str]:
    """A named set of ops, each normalized by ``op_name``."""
    return frozenset(map(op_name, names))


# Reinterpretations: no arithmetic, and (but for clone/_to_copy) no data movement.
VIEW = ops("view.default", "_unsafe_view.default", "reshape.default", "expand.default", "clone.default",
           "alias.default", "contiguous.default", "_reshape_alias.default", "lift_fresh.default")
UNSQUEEZE = ops("unsqueeze.default", "squeeze.dim", "squeeze.dims", "squeeze.default")
CAST = ops("_to_copy.default")
TRANSPOSE = ops("transpose.int", "t.default", "permute.default")
SCALE = ops("mul.Tensor", "mul.Scalar", "div.Tensor", "div.Scalar")
NO_DATA = VIEW - ops("clone.default", "contiguous.default") | UNSQUEEZE | TRANSPOSE | ops(
    "slice.Tensor", "select.int", "as_strided.default", "split.Tensor", "split_with_sizes.default",
    "unbind.int", "detach.default", "narrow.default", "diagonal.default", "unfold.default",
    "view_as_real.default", "view_as_complex.default", "chunk.default")

BMM = ops("bmm.default", "matmul.default")
MM = ops("mm.default")
ADDMM = ops("addmm.default")
LINEAR = ops("linear.default")
SOFTMAX = ops("_softmax.default", "softmax.int", "_safe_softmax.default")
ADD = ops("add.Tensor")
SUB = ops("sub.Tensor")
MASKED_FILL = ops("masked_fill.Scalar", "masked_fill.Tensor")
WHERE = ops("where.self")
SDPA = ops("scaled_dot_product_attention.default", "_scaled_dot_product_flash_attention_for_cpu.default",
           "_scaled_dot_product_flash_attention.default", "_scaled_dot_product_efficient_attention.default",
           "_scaled_dot_product_cudnn_attention.default", "_scaled_dot_product_attention_math.default",
           "_scaled_dot_product_fused_attention_overrideable.default")
MHA = ops("_native_multi_head_attention.default")
CONV = ops("convolution.default", "conv2d.default", "_convolution.default", "cudnn_convolution.default")
BATCH_NORM = ops("native_batch_norm.default", "_native_batch_norm_legit_no_training.default",
                 "batch_norm.default", "_native_batch_norm_legit.default")
ACT = ops("relu.default", "relu_.default", "gelu.default", "gelu_.default", "silu.default", "silu_.default",
          "tanh.default", "sigmoid.default", "hardswish.default", "hardswish_.default", "mish.default",
          "leaky_relu.default", "elu.default", "hardtanh.default", "hardtanh_.default", "relu6.default")
FUSABLE_ACT = {"aten.relu.default": "relu", "aten.relu_.default": "relu", "aten.silu.default": "silu",
               "aten.silu_.default": "silu", "aten.gelu.default": "gelu", "aten.gelu_.default": "gelu"}
LAYER_NORM = ops("native_layer_norm.default", "layer_norm.default")
RMS_NORM = ops("rms_norm.default", "_fused_rms_norm.default")
EMBEDDING = ops("embedding.default")
EMBEDDING_BAG = ops("_embedding_bag.default", "_embedding_bag_forward_only.default", "embedding_bag.default",
                    "embedding_bag.padding_idx")
CAT = ops("cat.default")
INDEX_COPY = ops("index_copy_.default", "index_copy.default", "index_put_.default", "index_put.default",
                 "slice_scatter.default", "scatter_.src", "scatter.src")
COPY = ops("copy_.default")
MEAN = ops("mean.dim")
VAR = ops("var.correction", "var.dim")
POW = ops("pow.Tensor_Scalar")
RSQRT = ops("rsqrt.default")
SQRT = ops("sqrt.default")
