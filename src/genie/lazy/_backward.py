"""An op that fails inside autograd's backward: its results become lost values that say why.

torch cannot carry a Python error out of one of autograd's C++ nodes (a derivative formula, grad
accumulation) on a device with a Python device guard: unwinding runs the engine's stream guard,
which calls into Python while the error is still set, and the process aborts (``terminate called
without an active exception``, SIGABRT). So there, instead of raising, the op returns tensors bound
to a FAILED node; the error surfaces where they are read (the gradient, an optimizer step), as a
failed run's values do. A custom ``autograd.Function``'s Python backward carries errors back
safely, so there they are raised as usual.

At exit, ``_drain_device_thread`` lets that device thread finish with the last backward before
the interpreter finalizes (the other way it could abort the process).
"""

from __future__ import annotations

import atexit
from typing import Any

import torch

from genie.graph import Node, TensorMeta, op_name
from genie.lazy import _lazy
from genie.lazy._lazy import LazyTensor, _meta_args, recorder_for
from genie.lazy._meta import UNDEFINED, infer, op_info
from genie.lazy._recorder import FAILED, Recorder

_PY_NODE = torch.autograd.function.BackwardCFunction


def in_cpp_backward() -> bool:
    """Whether the op running now was called by one of autograd's C++ nodes."""
    node = torch._C._current_autograd_node()
    return node is not None and not isinstance(node, _PY_NODE)


def failed_in_backward(func: torch._ops.OpOverload, args: tuple, kwargs: dict, e: BaseException) -> Any:
    """What ``func`` returns, as lost values naming ``e`` (or the value already lost it read)."""
    lost = next((a._node.args[0] for a in args if type(a) is LazyTensor and a._node.op == FAILED), None)
    why = lost or (f"{op_name(func)} failed in autograd's backward ({type(e).__name__}: {e}); it is "
                   "reported where its result is read, since torch cannot raise it there")
    info = op_info(func)
    try:
        metas = infer(func, *_meta_args(args, kwargs))
    except Exception:  # the shape is unknown too: autograd then refuses the gradient's shape
        metas = (TensorMeta((), (), torch.float32),) * info.n_returns
    rec = recorder_for(args)
    device = next((a._device for a in args if type(a) is LazyTensor), _lazy._DEFAULT_DEVICE)
    outs = [None if m is UNDEFINED else _lost(rec, m, device, why) for m in metas]
    if not info.multi:
        return outs[0]
    return outs if info.returns_list else tuple(outs)


_KEPT: list = []  # the drain's tensors: released by the main thread as it finalizes, never by autograd's


@atexit.register
def _drain_device_thread() -> None:
    """Let autograd's device thread finish before the interpreter finalizes. torch keeps a
    ``contextvars.Context`` in each backward's thread-local state; the device thread can drop the
    last reference to a finished backward just after its caller returned, and if the interpreter
    is finalizing by then, taking the GIL for that decref kills the thread mid-unwind (SIGABRT at
    exit, now and then, in a script that ends right after ``backward()``). A backward of our own
    on this device, with no such context and no result to hand back, queues behind it: once it
    returns, the device thread is past the last one. The tensors it touched are held here, so that
    thread never frees a Python object."""
    if not _lazy.AUTOGRAD_THREAD_SEEN:
        return
    try:
        x = torch.zeros((), device=_lazy._DEFAULT_DEVICE, requires_grad=True)
        y = x * 1
        _KEPT.extend((x, y))
        torch.autograd.Variable._execution_engine.run_backward(  # accumulates into x.grad
            (y,), (torch.ones((), device=x.device),), False, False, (), True, True)
    except Exception:  # at exit: nothing more to do
        pass


def _lost(rec: Recorder, meta: TensorMeta, device: torch.device, why: str) -> LazyTensor:
    """A tensor bound to a FAILED node, untracked: no run ever sends it."""
    node = Node(rec.new_id(), FAILED, (why,), outputs=(meta,), storages=(rec.new_id(),))
    t = torch.Tensor._make_wrapper_subclass(LazyTensor, meta.shape, meta.stride, meta.offset, None,
                                            meta.dtype, torch.strided, device)
    t._rec, t._node, t._index, t._meta, t._device = rec, node, 0, meta, device
    return t
