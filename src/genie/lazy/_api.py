"""``genie.capture()``, ``genie.get_graph()``, ``genie.trace()`` and module-path tracking."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from genie.graph import CONST, INPUT, RESIDENT, Graph
from genie.lazy._lazy import LazyTensor, capture_stack, dispatch, module_stack, wrap
from genie.lazy._recorder import Recorder

_tls = threading.local()
_names: weakref.WeakKeyDictionary[torch.nn.Module, dict[int, str]] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def capture() -> Iterator[Recorder]:
    """Record everything inside lazily; factory calls with no device land on the remote device.

    Thread-local and nestable. CPU parameters and module buffers used inside become weights
    (named by content digest), other CPU tensors become inputs in first-use order. Gradients are
    not recorded: the block runs under ``torch.no_grad()``.
    """
    rec = Recorder("capture")
    _install_host_deepcopy()
    stack = capture_stack()
    stack.append(rec)
    try:
        with torch.no_grad(), _HostOpsMode():
            yield rec
    finally:
        stack.remove(rec)
    # The graph is built on first ask: a capture that nobody inspects costs only its recording.
    _tls.last = (rec, rec.live_outputs(), None)


class _HostOpsMode(TorchDispatchMode):
    """Inside a capture every op is recorded: plain CPU tensors it meets become inputs.

    Factories land on the remote device: at this level torch has already filled in
    ``device=cpu``, so a factory named for the CPU and one with no device look alike.
    """

    def _dispatch(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _LIFT_FRESH:  # torch.tensor(data) in the program: a constant, not an input
            capture_stack()[-1].weight_ids.add(id(args[0]))
            return args[0]
        if not _has_tensor(args) and not _has_tensor(kwargs.values()):
            if "device" in kwargs and func in _FACTORY_DEVICE:
                kwargs["device"] = _REMOTE
            return func(*args, **kwargs)
        return dispatch(func, args, kwargs)


# Set after class creation: TorchDispatchMode wraps a class-body __torch_dispatch__ in a dynamo
# guard that costs microseconds per op, and this handler never runs under dynamo.
_HostOpsMode.__torch_dispatch__ = _HostOpsMode._dispatch


def _has_tensor(values) -> bool:
    for v in values:
        if isinstance(v, torch.Tensor):
            return True
        if type(v) in (list, tuple) and _has_tensor(v):
            return True
    return False


class _FactorySet:
    """Ops with a ``device`` argument and no tensor input: computed once per op."""

    def __init__(self) -> None:
        self._known: dict = {}

    def __contains__(self, func) -> bool:
        hit = self._known.get(func)
        if hit is None:
            hit = self._known[func] = any(a.name == "device" for a in func._schema.arguments)
        return hit


_FACTORY_DEVICE = _FactorySet()
_REMOTE = "remote_accelerator:0"
_LIFT_FRESH = torch.ops.aten.lift_fresh.default


_deepcopy_installed = False


def _install_host_deepcopy() -> None:
    """``copy.deepcopy`` of a host tensor inside a capture copies it on the host, as outside one.

    Its storage-level ops (an empty uint8 tensor ``set_`` onto a storage, then ``copy_``) are no
    program: recorded, the empty would land on the remote device with a CPU storage. The copy is a
    CPU tensor with equal bytes, so a copied module's weights are the original's constants.
    """
    global _deepcopy_installed
    if _deepcopy_installed:
        return
    for cls in (torch.Tensor, torch.nn.Parameter):
        original = cls.__deepcopy__

        def host_deepcopy(self, memo, _original=original):
            if capture_stack() and not isinstance(self, LazyTensor):
                with _disable_current_modes():
                    return _original(self, memo)
            return _original(self, memo)

        cls.__deepcopy__ = host_deepcopy
    _deepcopy_installed = True


def get_graph() -> Graph:
    """The graph of this thread's last finished ``capture()``."""
    last = getattr(_tls, "last", None)
    if last is None:
        raise RuntimeError("genie.get_graph(): no capture has finished in this thread")
    rec, outputs, graph = last
    if not outputs:
        ops = sum(n.op not in (CONST, INPUT, RESIDENT) for n in rec.history or ())
        raise RuntimeError(
            f"genie.get_graph(): the last capture recorded {ops} op(s) but has no output: no tensor "
            "it computed was still referenced when its block ended. Bind the result inside the block "
            "(out = model(x)), or use genie.trace(fn, *inputs), whose outputs are what fn returns")
    if graph is None:
        graph = rec.graph(outputs)
        _tls.last = (rec, outputs, graph)
    return graph


def trace(fn: Callable[..., Any], *example_inputs: torch.Tensor) -> Graph:
    """Record ``fn(*example_inputs)`` as a Graph whose inputs and outputs are explicit.

    Inputs are the example tensors' positions; any other CPU tensor ``fn`` reads is a constant.
    """
    rec = Recorder("trace")
    stack = capture_stack()
    stack.append(rec)
    try:
        with torch.no_grad(), torch.device("remote_accelerator:0"):
            device = torch.device("remote_accelerator:0")
            lazy = []
            for t in example_inputs:
                node = rec.input_node(t)
                lazy.append(wrap(rec, node, 0, node.outputs[0], device))
            result = fn(*lazy)
    finally:
        stack.remove(rec)
    leaves, _ = tree_flatten(result)
    outputs = [x for x in leaves if isinstance(x, LazyTensor)]
    if not outputs:
        raise TypeError("genie.trace: fn returned no tensor computed from its inputs")
    return rec.graph(outputs)


# -- module paths: recorded on every node -------------------------------------------------------
def _qualified_name(module: torch.nn.Module, stack: list[str]) -> str:
    if not stack:
        _tls.root = module
    root = getattr(_tls, "root", module)
    names = _names.get(root)
    if names is None:
        names = _names[root] = {id(m): n for n, m in root.named_modules()}
    name = names.get(id(module))
    if name is None:  # a module called from outside its root's tree
        name = f"{stack[-1]}.{type(module).__name__}" if stack else type(module).__name__
    return name


def _pre_hook(module: torch.nn.Module, args: Any) -> None:
    stack = module_stack()
    stack.append(_qualified_name(module, stack))
    caps = capture_stack()
    if caps:
        caps[-1].weight_ids.update(map(id, module._buffers.values()))


def _post_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
    stack = module_stack()
    if stack:
        stack.pop()


_hooks_installed = False


def install_module_hooks() -> None:
    global _hooks_installed
    if not _hooks_installed:
        torch.nn.modules.module.register_module_forward_pre_hook(_pre_hook)
        torch.nn.modules.module.register_module_forward_hook(_post_hook, always_call=True)
        _hooks_installed = True
