"""The ``remote_accelerator`` device: PrivateUse1 renamed, a device module, lazy factory kernels.

Factory ops on the device return LazyTensors: ``empty.memory_format`` and ``empty_strided`` through
their own kernels, every other aten factory (randn, arange, triu_indices, windows: ``FACTORIES``) as
one node of its own, and the few that cannot run remotely (``REFUSED_FACTORIES``) raise
UnsupportedOpError saying why. ``.to(device)`` is an empty followed by a copy into it, which then
reaches ``LazyTensor.__torch_dispatch__``.
"""

from __future__ import annotations

import types

import torch

from genie._errors import UnsupportedOpError
from genie.graph import Node, TensorMeta, op_name, overload, registry
from genie.lazy import _lazy
from genie.lazy._lazy import _NUMBERS, RNG, copy_into, current_recorder, module_path, wrap
from genie.lazy._meta import SHAPES, op_info

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


# Every aten factory (no tensor argument, a ``device`` argument) records one node on the device:
# a composite kernel would fill an ``out=`` tensor it resizes (arange starts from an empty of size 0),
# which a wrapper cannot do, and ops such as triu_indices have no composite at all. A test checks
# this table and REFUSED_FACTORIES against the installed torch's registry, so none goes missing.
FACTORIES = (
    "arange", "arange.start", "arange.start_step", "range", "range.step",
    "linspace", "logspace", "full", "zeros", "ones", "eye", "eye.m", "scalar_tensor",
    "empty_permuted", "tril_indices", "triu_indices", "fft_fftfreq", "fft_rfftfreq",
    "bartlett_window", "bartlett_window.periodic", "blackman_window", "blackman_window.periodic",
    "hamming_window", "hamming_window.periodic", "hamming_window.periodic_alpha",
    "hamming_window.periodic_alpha_beta", "hann_window", "hann_window.periodic",
    "kaiser_window", "kaiser_window.periodic", "kaiser_window.beta",
    "rand", "rand.generator", "randn", "randn.generator", "randint", "randint.generator",
    "randint.low", "randint.low_generator", "randperm", "randperm.generator", "normal.float_float",
)
# (empty.memory_format and empty_strided have their own kernels above.) name -> why refused
REFUSED_FACTORIES: dict[str, str] = {
    "from_file": "it reads a file on the server",
    "_cudnn_init_dropout_state": "cuDNN's private dropout state",
    "_efficientzerotensor": "torch's internal zero tensor has no wire form",
    "_empty_affine_quantized": "quantized dtypes cannot travel as bytes",
    "_make_dep_token": "an internal token of torch.compile's effect ordering",
    "_sparse_coo_tensor_with_dims": "sparse layouts are not supported",
    "_sparse_compressed_tensor_with_dims": "sparse layouts are not supported",
    "sparse_coo_tensor.size": "sparse layouts are not supported",
}


def _factory_kernel(func: torch._ops.OpOverload):
    name = op_name(func)
    seeded = torch.Tag.nondeterministic_seeded in func.tags
    arg_names = {a.name for a in func._schema.arguments}
    info = op_info(func)  # the shape-cache key policy: a fill value keys by type, sizes by value
    typed, typed_kw = info.typed, info.typed_kw

    def kernel(*args, **kwargs):
        gen = kwargs.pop("generator", None)
        meta_kwargs = {**kwargs, "device": "meta"}
        if "generator" in arg_names:  # required by name in the .generator overloads
            meta_kwargs["generator"] = None
        # the default dtype is in: ``zeros(3)`` and ``arange(5.0)`` take it when no dtype is given
        key = (name, _default_dtype(), *[_part(v, typed[i]) for i, v in enumerate(args)],
               *[(k, _part(v, k in typed_kw)) for k, v in kwargs.items()])
        try:
            hit = SHAPES.lookup(key)
        except TypeError:  # an unhashable argument: no caching
            hit = key = None
        if hit is None:
            m = TensorMeta.of(func(*args, **meta_kwargs))
            if key is not None:
                SHAPES.store(key, (m,))
        else:
            m = hit[0]
        seed = None
        if seeded:  # a generator object cannot travel: draw the remote seed from it instead
            seed = RNG.next_seed() if gen is None else int(torch.randint(1 << 62, (1,), generator=gen))
        rec = current_recorder()
        with rec.lock:
            nid = rec.new_id()
            node = rec.add(Node(nid, name, tuple(args), dict(kwargs), (m,), storages=(nid,),
                                module=module_path(), seed=seed))
            return wrap(rec, node, 0, m, torch.device(kwargs["device"]))

    return kernel


_default_dtype = torch.get_default_dtype


def _part(v, typed: bool):
    """A factory argument as a key part: lists become tuples; a number where the schema takes a
    Scalar is its type only (``OpInfo.typed``); other non-ints keep their type, since
    ``full((2,), 1)`` and ``full((2,), 1.0)`` differ in dtype but ``1 == 1.0``."""
    t = type(v)
    if typed and t in _NUMBERS:
        return t
    if t is list or t is tuple:
        return tuple([_part(x, False) for x in v])
    return v if t is int else (t, v)


def _refused_kernel(name: str, why: str):
    def kernel(*args, **kwargs):
        raise UnsupportedOpError(f"aten.{name}", f"not on {DEVICE_TYPE}: {why}")

    return kernel


def _copy_from(src, dst, non_blocking=False):
    # torch.tensor(..., device=...) copies with the Python key excluded, so it lands here
    return copy_into(torch.ops.aten.copy_.default, (dst, src), {})


def _key(name: str) -> str:
    """``"eye.m"`` -> its registry key ``"aten.eye.m"``."""
    packet, _, ov = name.partition(".")
    return f"aten.{packet}.{ov or 'default'}"


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
    known = registry()
    for name in FACTORIES:
        parts = _key(name)
        if parts in known:  # older torches lack a few
            _lib.impl(name, _factory_kernel(overload(known[parts])), "PrivateUse1")
    for name, why in REFUSED_FACTORIES.items():
        if _key(name) in known:  # a sparse layout dispatches on the sparse key of the device
            for key in ("PrivateUse1", "SparsePrivateUse1"):
                _lib.impl(name, _refused_kernel(name, why), key)
    _registered = True
