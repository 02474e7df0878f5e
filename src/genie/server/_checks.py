"""Which arguments of which op address another tensor, and the checks that hold them to it: the
table ``INDEX_CHECKS`` (op packet -> check), built from ``_bounds``' parts (``Bound``, ``SameShape``,
``PerChannel``...) and the functions here for ops whose rules do not fit one of those.

Rows are keyed by op packet (``aten.gather``): every overload of it (``.default``, ``.out``, the
in-place twin) names its arguments alike, which ``tests/test_trust_vetted.py`` checks against the
schemas. An op that takes indices and has no row here is not on the vetted list
(``genie.graph.VETTED``): the server refuses it unless started with ``--ops all``.
"""

from __future__ import annotations

import math
import re

import torch

from genie.graph import registry
from genie.server._bounds import (
    All,
    BadIndexError,
    Bound,
    Call,
    Check,
    PerChannel,
    PoolIndices,
    SameShape,
    Signature,
    declared_numel,
    dim_of,
    index_list,
    ints,
    nondecreasing,
    signature,
)


def embedding_dense_backward(call: Call) -> None:
    n = call["num_weights"]
    call.within("indices", call.int_values("indices"), 0, n, f"num_weights is {n}")


def embedding_bag(call: Call) -> None:
    """Indices into ``weight``'s rows; bags cut by ``offsets`` (non-decreasing, from 0, never past
    the indices); per-sample weights shaped as the indices."""
    weight, indices = call.tensor("weight"), call.int_values("indices")
    if weight is None or indices is None:
        return
    n = weight.shape[0] if weight.dim() else 0
    if indices.dim() != 1:
        raise BadIndexError(f"embedding_bag takes 1-d indices here, not {indices.dim()}-d")
    call.within("indices", indices, 0, n, f"weight has {n} rows")
    if call["mode"] not in (0, 1, 2):
        raise BadIndexError(f"mode {call['mode']!r} is not sum (0), mean (1) or max (2)")
    pad = call["padding_idx"]
    if pad is not None and not -1 <= pad < n:
        raise BadIndexError(f"padding_idx {pad} is outside [-1, {n})")
    embedding_bag_offsets(call, indices)
    psw = call.tensor("per_sample_weights")
    if psw is not None and tuple(psw.shape) != tuple(indices.shape):
        raise BadIndexError("per_sample_weights must have the shape of indices")


def embedding_bag_backward(call: Call) -> None:
    """The forward's bookkeeping, handed back: indices below ``num_weights``, each one's bag in
    ``offset2bag`` below the bag count (``grad``'s rows), max mode's winners below ``num_weights``."""
    grad, n = call.tensor("grad"), call["num_weights"]
    indices, offset2bag = call.int_values("indices"), call.int_values("offset2bag")
    if grad is None or indices is None or offset2bag is None or type(n) is not int:
        return
    if call["sparse"]:
        raise BadIndexError("a sparse gradient has no wire form")
    bags = grad.shape[0] if grad.dim() else 0
    call.within("indices", indices, 0, n, f"num_weights is {n}")
    if offset2bag.numel() not in (0, indices.numel()):
        raise BadIndexError("offset2bag must hold one bag per index")
    call.within("offset2bag", offset2bag, 0, bags, f"grad has {bags} bags")
    bag_size = call.int_values("bag_size")
    if bag_size is None or bag_size.numel() < bags:
        raise BadIndexError(f"bag_size must hold {bags} values")
    call.within("maximum_indices", call.int_values("maximum_indices"), -1, n, f"num_weights is {n}")
    if "offsets" in call.names:
        embedding_bag_offsets(call, indices)
    pad = call["padding_idx"]
    if pad is not None and not -1 <= pad < n:
        raise BadIndexError(f"padding_idx {pad} is outside [-1, {n})")
    psw = call.tensor("per_sample_weights")
    if psw is not None and tuple(psw.shape) != tuple(indices.shape):
        raise BadIndexError("per_sample_weights must have the shape of indices")


def embedding_bag_offsets(call: Call, indices: torch.Tensor) -> None:
    offsets = call.int_values("offsets")
    if offsets is None or offsets.dim() != 1 or offsets.numel() == 0:
        raise BadIndexError("offsets must be a non-empty 1-d tensor")
    call.within("offsets", offsets, 0, indices.numel() + 1, f"indices has {indices.numel()} elements")
    nondecreasing(offsets, "offsets")


def pack_padded(call: Call) -> None:
    """Sequence lengths: one per batch entry, each in [1, T], longest first."""
    x, lengths = call.tensor("input"), call.int_values("lengths")
    if x is None or lengths is None or x.dim() < 2:
        return
    t_max, batch = (x.shape[1], x.shape[0]) if call["batch_first"] else (x.shape[0], x.shape[1])
    if lengths.dim() != 1 or lengths.numel() != batch:
        raise BadIndexError(f"lengths must be 1-d with {batch} values")
    call.within("lengths", lengths, 1, t_max + 1, f"input has {t_max} time steps")
    if batch > 1 and bool((lengths[1:] > lengths[:-1]).any()):
        raise BadIndexError("lengths must be sorted longest first")


def grouped_mm(call: Call) -> None:
    """Group ends in ``offs``: non-decreasing, within the dim the groups split (rows of a 2-d
    ``self`` against a 3-d ``mat2``, columns of a 2-d ``mat2`` against a 3-d ``self``, the shared
    dim of two 2-d operands), one per group."""
    a, b, offs = call.tensor("self"), call.tensor("mat2"), call.int_values("offs")
    if a is None or b is None or offs is None:
        return
    sizes = {(2, 3): (a.shape[0], b.shape[0]), (3, 2): (b.shape[-1], a.shape[0]),
             (2, 2): (a.shape[-1], None)}.get((a.dim(), b.dim()))
    if sizes is None:
        raise BadIndexError(f"offs does not apply to {a.dim()}-d by {b.dim()}-d operands")
    size, groups = sizes
    if offs.dim() != 1 or (groups is not None and offs.numel() != groups):
        raise BadIndexError(f"offs must be 1-d with one end per group ({groups})")
    call.within("offs", offs, 0, size + 1, f"the grouped dim has {size} entries")
    nondecreasing(offs, "offs")


def segment_reduce(call: Call) -> None:
    """Segments of ``data`` along ``axis``: ``lengths`` (non-negative, summing to the axis' size)
    or ``offsets`` (non-decreasing, within it), one row per leading index of ``data``."""
    data = call.tensor("data")
    if data is None:
        return
    if call["indices"] is not None:
        raise BadIndexError("segment_reduce by indices is not supported")
    axis = dim_of(call, data, "axis")
    size = data.shape[axis] if data.dim() else 1
    lengths, offsets = call.int_values("lengths"), call.int_values("offsets")
    if (lengths is None) == (offsets is None):
        raise BadIndexError("segment_reduce takes exactly one of lengths and offsets")
    seg = lengths if lengths is not None else offsets
    assert seg is not None
    if seg.dim() != axis + 1 or tuple(seg.shape[:-1]) != tuple(data.shape[:axis]):
        raise BadIndexError(f"{'lengths' if lengths is not None else 'offsets'} of shape "
                            f"{list(seg.shape)} do not match data of shape {list(data.shape)} at "
                            f"axis {axis}")
    if lengths is not None:
        call.within("lengths", lengths, 0, size + 1, f"data has {size} entries along axis {axis}")
        if lengths.numel() and bool((lengths.sum(-1) != size).any()):
            raise BadIndexError(f"lengths must sum to {size}, the size of data along axis {axis}")
    else:
        if seg.shape[-1] == 0:
            raise BadIndexError("offsets must hold at least one value")
        call.within("offsets", offsets, 0, size + 1, f"data has {size} entries along axis {axis}")
        nondecreasing(seg, "offsets")


def ctc(call: Call) -> None:
    """CTC's class ids (targets, blank) below the class count C of ``log_probs`` (T, N, C) or
    (T, C); input lengths within T; target lengths within what ``targets`` holds."""
    lp, targets = call.tensor("log_probs"), call.tensor("targets")
    if lp is None or targets is None or lp.dim() not in (2, 3):
        return  # torch refuses these shapes itself, on the host
    t_max, c = lp.shape[0], lp.shape[-1]
    batch = lp.shape[1] if lp.dim() == 3 else 1
    blank = call["blank"]
    if type(blank) is not int or not 0 <= blank < c:
        raise BadIndexError(f"blank {blank!r} is outside [0, {c})")
    inp, tgt = call.int_values("input_lengths"), call.int_values("target_lengths")
    if inp is None or tgt is None or inp.numel() != batch or tgt.numel() != batch:
        raise BadIndexError(f"input_lengths and target_lengths must hold {batch} values each")
    call.within("input_lengths", inp, 0, t_max + 1, f"log_probs has {t_max} time steps")
    ints(targets)
    if targets.dim() == 2 and lp.dim() == 3:
        if targets.shape[0] != batch:
            raise BadIndexError(f"targets must have {batch} rows")
        call.within("target_lengths", tgt, 0, targets.shape[1] + 1, f"targets rows hold {targets.shape[1]}")
        used = targets[torch.arange(targets.shape[1], device=targets.device) < tgt.reshape(-1, 1).to(
            targets.device)]
    elif targets.dim() <= 1:
        call.within("target_lengths", tgt, 0, targets.numel() + 1, "targets")
        total = int(tgt.sum())
        if total > targets.numel():
            raise BadIndexError(f"target_lengths add up to {total}, but targets holds {targets.numel()}")
        used = targets.reshape(-1)[:total]
    else:
        raise BadIndexError(f"targets must be 1-d or 2-d, not {targets.dim()}-d")
    call.within("targets", used, 0, c, f"log_probs has {c} classes")
    alpha = call.tensor("log_alpha")  # the backward's saved forward variables
    if alpha is not None:
        grad = call.tensor("grad")
        if grad is None or grad.numel() != batch:
            raise BadIndexError(f"grad must hold {batch} values, one per batch entry")
        s_max = int(tgt.max()) if tgt.numel() else 0
        want = (batch, t_max, 2 * s_max + 1)
        if alpha.dim() != 3 or any(a < w for a, w in zip(alpha.shape, want, strict=True)):
            raise BadIndexError(f"log_alpha of shape {list(alpha.shape)} is smaller than {list(want)}")
        nll = call.tensor("neg_log_likelihood")
        if nll is None or nll.numel() < batch:
            raise BadIndexError(f"neg_log_likelihood must hold {batch} values")


def class_targets(call: Call) -> None:
    """Class-index targets (nll_loss, cross_entropy): each in [0, C), or the ``ignore_index``."""
    x, target = call.tensor("self"), call.tensor("target")
    if x is None or target is None or target.dtype.is_floating_point:
        return  # cross_entropy with class probabilities: nothing indexes
    c = x.shape[1] if x.dim() >= 2 else (x.shape[0] if x.dim() == 1 else 1)
    ints(target)
    ignore = call["ignore_index"]
    if ignore is not None and target.numel():
        target = target[target != ignore]
    call.within("target", target, 0, c, f"the input has {c} classes")
    weight = call.tensor("weight")
    if weight is not None and weight.numel() != c:
        raise BadIndexError(f"weight holds {weight.numel()} values for {c} classes")


def multilabel_targets(call: Call) -> None:
    x, target = call.tensor("self"), call.tensor("target")
    if x is None or target is None:
        return
    c = x.shape[-1] if x.dim() else 1
    call.within("target", ints(target), -1, c, f"the input has {c} classes (-1 ends a row)")


def one_hot(call: Call) -> None:
    """Class ids below ``num_classes``; with -1 (from the data), the largest id must make the
    width the node declares, so that the data never sizes an allocation by itself."""
    x, n = call.int_values("self"), call["num_classes"]
    if x is None:
        return
    if n is not None and n >= 0:
        call.within("self", x, 0, n, f"num_classes is {n}")
        return
    width = call.declared[0].shape[-1] if call.declared and call.declared[0].shape else 0
    call.within("self", x, 0, width, f"the graph declares {width} classes")


def bincount(call: Call) -> None:
    x = call.int_values("self")
    if x is None:
        return
    size = declared_numel(call) or 0
    call.within("self", x, 0, size, f"the graph declares {size} bins")
    w = call.tensor("weights")
    if w is not None and tuple(w.shape) != tuple(x.shape):
        raise BadIndexError("weights must have the shape of the input")


def repeat_interleave(call: Call) -> None:
    """Repeat counts: non-negative, making ``output_size`` entries along the dim when it is given
    (CUDA's kernel writes that many, trusting it), and the size the node declares (the counts
    would otherwise size the allocation)."""
    repeats, x = call["repeats"], call.tensor("self")
    if x is None:  # ``.Tensor``: repeats alone, the output is the indices repeated
        n, rest = None, 1
    else:
        dim = call["dim"]
        n = x.numel() if dim is None else (x.shape[dim_of(call, x, "dim")] if x.dim() else 1)
        rest = 1 if dim is None else x.numel() // max(n, 1)
    if isinstance(repeats, torch.Tensor):
        if repeats.dim() > 1:
            raise BadIndexError("repeats must be 0-d or 1-d")
        call.within("repeats", ints(repeats), 0, 1 << 62, "a repeat count")
        along = int(repeats.sum())
        if n is not None and repeats.numel() == 1:
            along *= n
    elif type(repeats) is int and repeats >= 0:
        along = repeats * (n or 0)
    else:
        raise BadIndexError(f"repeats {repeats!r} must be a non-negative int")
    out = call["output_size"]
    if out is not None and out != along:
        raise BadIndexError(f"output_size {out} differs from the {along} entries the repeats make")
    declared = declared_numel(call)
    if declared is not None and declared != along * rest:
        raise BadIndexError(f"the repeats make {along * rest} elements, but the graph declares {declared}")


def resize(call: Call) -> None:
    """``resize_``/``resize_as_``: no more elements than the node declares, so that the size a
    client asks for cannot allocate (and the guards then zero) more than its graph said."""
    size = call["size"] if "size" in call.names else (
        tuple(t.shape) if (t := call.tensor("the_template")) is not None else None)
    if not isinstance(size, (list, tuple)) or not all(type(n) is int and n >= 0 for n in size):
        raise BadIndexError(f"size {size!r:.60} must be a list of non-negative ints")
    n = math.prod(size)
    declared = declared_numel(call)
    if declared is None or n > declared:
        raise BadIndexError(f"resizing to {n} elements, but the graph declares {declared}")


def masked_scatter(call: Call) -> None:
    x, mask, source = call.tensor("self"), call.tensor("mask"), call.tensor("source")
    if x is None or mask is None or source is None:
        return
    if mask.dtype != torch.bool:
        raise BadIndexError(f"mask must be bool, not {mask.dtype}")
    count = int(torch.broadcast_to(mask, x.shape).sum())
    if count > source.numel():
        raise BadIndexError(f"the mask selects {count} elements, but source holds {source.numel()}")


_SELF_DIM = Bound("index", "self", "dim")

# op packet -> its check. Each kind of argument that addresses another tensor's memory has a row.
INDEX_CHECKS: dict[str, Check] = {
    "aten.embedding": Bound("indices", "weight", 0),
    "aten.embedding_dense_backward": embedding_dense_backward,
    "aten.embedding_bag": embedding_bag,
    "aten._embedding_bag": embedding_bag,
    "aten._embedding_bag_forward_only": embedding_bag,
    "aten._embedding_bag_backward": embedding_bag_backward,
    "aten._embedding_bag_dense_backward": embedding_bag_backward,
    "aten.max_pool2d_with_indices_backward": PoolIndices(2),
    "aten.max_pool3d_with_indices_backward": PoolIndices(3),
    "aten._pack_padded_sequence": pack_padded,
    "aten._grouped_mm": grouped_mm,
    "aten.native_batch_norm": PerChannel(("weight", "bias", "running_mean", "running_var")),
    "aten._native_batch_norm_legit": PerChannel(("weight", "bias", "running_mean", "running_var")),
    "aten._native_batch_norm_legit_no_training": PerChannel(("weight", "bias", "running_mean",
                                                             "running_var")),
    "aten.native_batch_norm_backward": All((PerChannel(("weight", "running_mean", "running_var"),
                                                       ("save_mean", "save_invstd")),
                                            SameShape((("grad_out", "input"),)))),
    "aten._log_softmax_backward_data": SameShape((("grad_output", "output"),)),
    "aten._softmax_backward_data": SameShape((("grad_output", "output"),)),
    "aten._weight_norm_interface_backward": SameShape((("grad_w", "saved_v"), ("saved_g", "saved_norms"))),
    "aten.searchsorted": Bound("sorter", "sorted_sequence", -1),
    **dict.fromkeys(("aten.gather", "aten.scatter", "aten.scatter_", "aten.scatter_add", "aten.scatter_add_",
                     "aten.scatter_reduce", "aten.scatter_reduce_", "aten.index_select", "aten.index_add",
                     "aten.index_add_", "aten.index_copy", "aten.index_copy_", "aten._index_copy_",
                     "aten.index_reduce", "aten.index_reduce_"), _SELF_DIM),
    "aten.index_fill": Bound("index", "self", "dim", negative=True),
    "aten.index_fill_": Bound("index", "self", "dim", negative=True),
    "aten.take": Bound("index", "self", None, negative=True),
    "aten.put": Bound("index", "self", None, negative=True),
    "aten.put_": Bound("index", "self", None, negative=True),
    **dict.fromkeys(("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_",
                     "aten._unsafe_index", "aten._unsafe_index_put"), index_list),
    "aten.segment_reduce": segment_reduce,
    "aten._segment_reduce_backward": segment_reduce,
    **dict.fromkeys(("aten.ctc_loss", "aten._ctc_loss", "aten._ctc_loss_backward"), ctc),
    **dict.fromkeys(("aten.nll_loss", "aten.nll_loss_forward", "aten.nll_loss2d", "aten.nll_loss2d_forward",
                     "aten.nll_loss_nd", "aten.nll_loss_backward", "aten.nll_loss2d_backward",
                     "aten.cross_entropy_loss", "aten.multi_margin_loss",
                     "aten.multi_margin_loss_backward"), class_targets),
    "aten.multilabel_margin_loss": multilabel_targets,
    "aten.multilabel_margin_loss_forward": multilabel_targets,
    "aten.one_hot": one_hot,
    "aten.bincount": bincount,
    "aten.repeat_interleave": repeat_interleave,
    "aten.resize_": resize,
    "aten.resize_as_": resize,
    "aten.masked_scatter": masked_scatter,
    "aten.masked_scatter_": masked_scatter,
}


# Tensor arguments whose names say they may index (``INDEX_LIKE``), in ops that have no row above
# because they index nothing: op packet -> why (reviewed; a test holds every vetted op to this).
INDEX_LIKE = re.compile(r"ind|offs|length|target|repeats|batch_sizes|bag|sorter|perm|position|mask")
NOT_INDICES: dict[str, str] = {
    **dict.fromkeys(("aten.binary_cross_entropy", "aten.binary_cross_entropy_with_logits", "aten.mse_loss",
                     "aten.mse_loss_backward", "aten.huber_loss", "aten.smooth_l1_loss",
                     "aten.soft_margin_loss", "aten.l1_loss", "aten.kl_div"),
                    "target: values of the input's shape, compared elementwise (torch checks the shapes)"),
    **dict.fromkeys(("aten.masked_fill", "aten.masked_fill_", "aten.masked_select",
                     "aten._native_multi_head_attention", "aten._transformer_encoder_layer_fwd",
                     "aten._scaled_dot_product_flash_attention_for_cpu",
                     "aten._scaled_dot_product_flash_attention_for_cpu_backward",
                     "aten.scaled_dot_product_attention"),
                    "mask: a boolean or additive mask broadcast against the input (torch checks the shapes)"),
}


def packet(op: str) -> str:
    return op.rpartition(".")[0]


def index_check(op: str) -> tuple[Check, Signature] | None:
    """The check of registry op ``op`` and its signature, or None when it indexes nothing."""
    check = INDEX_CHECKS.get(packet(op))
    if check is None or op not in registry():
        return None
    return check, signature(op)
