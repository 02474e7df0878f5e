"""The ``remote_accelerator`` device: PrivateUse1 renamed, a device module, lazy factory kernels.

Factory ops on the device (``empty.memory_format``, ``empty_strided``) return LazyTensors; every
other factory (randn, zeros, arange, ``.to``) is an empty followed by an op on it, which then
reaches ``LazyTensor.__torch_dispatch__``.
"""

from __future__ import annotations

import types

import torch

from genie.graph import Node, TensorMeta
from genie.graph._ops import op_name
from genie.lazy import _lazy
from genie.lazy._lazy import RNG, copy_into, current_recorder, module_path, wrap

DEVICE_TYPE = "remote_accelerator"
DEVICE_COUNT = 8  # logical devices; each is an index the server maps to its own device
_registered = False
_lib: torch.library.Library | None = None


def _device_module() -> types.ModuleType:
    mod = types.ModuleType(DEVICE_TYPE)
    mod.is_available = lambda: True
    mod.device_count = lambda: DEVICE_COUNT
    mod.current_device = lambda: 0
    mod.set_device = lambda d: None
    mod._is_in_bad_fork = lambda: False
    mod.is_initialized = lambda: True
    mod.manual_seed = RNG.seed
    mod.manual_seed_all = RNG.seed
    mod.seed = lambda: RNG.seed(torch.initial_seed())
    mod.seed_all = mod.seed
    mod.initial_seed = lambda: RNG.base
    mod.synchronize = lambda device=None: None
    return mod


def _empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    meta = torch.empty(size, dtype=dtype or torch.get_default_dtype(), device="meta",
                       memory_format=memory_format or torch.contiguous_format)
    return _factory("aten.empty.memory_format", (list(size),),
                    {"dtype": meta.dtype, "device": device}, meta, device)


def _empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):
    meta = torch.empty_strided(size, stride, dtype=dtype or torch.get_default_dtype(), device="meta")
    return _factory("aten.empty_strided.default", (list(size), list(stride)),
                    {"dtype": meta.dtype, "device": device}, meta, device)


def _factory(op: str, args: tuple, kwargs: dict, meta_t: torch.Tensor, device) -> torch.Tensor:
    rec = current_recorder()
    meta = TensorMeta.of(meta_t)
    device = torch.device(device)
    with rec.lock:
        nid = rec.new_id()
        node = rec.add(Node(nid, op, args, kwargs, (meta,), storages=(nid,), module=module_path()))
        return wrap(rec, node, 0, meta, device)


# Factories whose composite kernel would fill an ``out=`` tensor it resizes (arange starts from an
# empty of size 0): a wrapper cannot change its size, so these record one node each instead.
_FACTORIES = (
    "arange", "arange.start", "arange.start_step", "linspace", "logspace", "full", "zeros", "ones",
    "rand", "randn", "randint", "randint.low", "eye", "eye.m", "scalar_tensor", "randperm",
)


def _factory_kernel(func: torch._ops.OpOverload):
    name = op_name(func)
    seeded = torch.Tag.nondeterministic_seeded in func.tags

    def kernel(*args, **kwargs):
        meta = func(*args, **{**kwargs, "device": "meta"})
        rec = current_recorder()
        m = TensorMeta.of(meta)
        with rec.lock:
            nid = rec.new_id()
            node = rec.add(Node(nid, name, tuple(args), dict(kwargs), (m,), storages=(nid,),
                                module=module_path(), seed=RNG.next_seed() if seeded else None))
            return wrap(rec, node, 0, m, torch.device(kwargs["device"]))

    return kernel


def _copy_from(src, dst, non_blocking=False):
    # torch.tensor(..., device=...) copies with the Python key excluded, so it lands here
    return copy_into(torch.ops.aten.copy_.default, (dst, src), {})


def register() -> None:
    """Idempotent: make ``remote_accelerator`` a torch device backed by LazyTensors."""
    global _registered, _lib
    if _registered:
        return
    mod = _device_module()
    try:
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        # also registers a device guard: autograd needs one to record ops on the device
        _setup_privateuseone_for_python_backend(rename=DEVICE_TYPE, backend_module=mod)
    except ImportError:  # older torch: no Python device guard, inference still works
        torch.utils.rename_privateuse1_backend(DEVICE_TYPE)
        torch._register_device_module(DEVICE_TYPE, mod)
        torch.utils.generate_methods_for_privateuse1_backend()
    _lazy._DEFAULT_DEVICE = torch.device(f"{DEVICE_TYPE}:0")
    _lib = torch.library.Library("aten", "IMPL")
    _lib.impl("empty.memory_format", _empty, "PrivateUse1")
    _lib.impl("empty_strided", _empty_strided, "PrivateUse1")
    _lib.impl("_copy_from", _copy_from, "PrivateUse1")
    for name in _FACTORIES:
        packet, _, overload = name.partition(".")
        func = getattr(getattr(torch.ops.aten, packet), overload or "default")
        _lib.impl(name, _factory_kernel(func), "PrivateUse1")
    _registered = True
