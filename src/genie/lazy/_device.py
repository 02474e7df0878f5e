"""The ``remote_accelerator`` device: PrivateUse1 renamed, a device module, lazy factory kernels.

Factory ops on the device return LazyTensors: ``empty.memory_format`` and ``empty_strided`` through
their own kernels, every other aten factory (randn, arange, triu_indices, windows: ``FACTORIES``) as
one node of its own, and the few that cannot run remotely (``REFUSED_FACTORIES``) raise
UnsupportedOpError saying why. ``.to(device)`` is an empty followed by a copy into it, which then
reaches ``LazyTensor.__torch_dispatch__``.
"""

from __future__ import annotations

import dataclasses
import types
import warnings
import weakref
from collections.abc import Callable

import torch

from genie._errors import GenieError, UnsupportedOpError
from genie.graph import Node, TensorMeta, op_name, overload, registry
from genie.lazy import _lazy
from genie.lazy._lazy import _NUMBERS, LazyTensor, copy_into, current_recorder, module_path, wrap
from genie.lazy._meta import SHAPES, op_info
from genie.lazy._rng import RNG
from genie.runtime import backend

DEVICE_TYPE = "remote_accelerator"
_registered = False
_lib: torch.library.Library | None = None


def _device_module() -> types.ModuleType:
    """``torch.remote_accelerator``: what a CUDA user reaches for in ``torch.cuda``. Device ``i`` is
    the i-th connected server (``genie.connect([...])``; one, the embedded default, else), so the
    functions that take an index check it and ask that server."""
    mod = types.ModuleType(DEVICE_TYPE)
    mod.is_available = is_available
    mod.device_count = device_count
    mod.current_device = lambda: 0
    mod.set_device = lambda d: None
    mod._is_in_bad_fork = lambda: False
    mod.is_initialized = lambda: True
    mod.manual_seed = RNG.seed
    mod.manual_seed_all = RNG.seed
    mod.seed = lambda: RNG.seed(torch.initial_seed())
    mod.seed_all = mod.seed
    mod.initial_seed = lambda: RNG.base
    mod.synchronize = synchronize
    mod.memory_allocated = lambda device=None: int(_report(device)["memory_allocated"])
    mod.max_memory_allocated = lambda device=None: int(_report(device)["max_memory_allocated"])
    mod.get_device_name = lambda device=None: str(_report(device)["device_name"])
    mod.get_device_properties = get_device_properties
    mod.DeviceProperties = DeviceProperties
    return mod


@dataclasses.dataclass(frozen=True)
class DeviceProperties:
    """``torch.remote_accelerator.get_device_properties()``: the server's device, as it reports it."""

    name: str
    type: str  # the server's torch device type: "cuda" or "cpu"
    total_memory: int  # bytes: the GPU's memory; on a CPU server its --memory-limit, else its RAM


def device_count() -> int:
    """The number of connected servers: each is one device."""
    count = getattr(backend(), "device_count", None)
    return count() if count is not None else 1


def _servers() -> str:
    b = backend()
    addresses = getattr(b, "addresses", None)
    if addresses is not None:
        return ", ".join(f"{i}: {a}" for i, a in enumerate(addresses))
    address = getattr(b, "address", "in process")
    return f"0: {address or 'the embedded server'}"


def check_device(device: torch.device) -> None:
    """A factory's device past the connected servers raises here, where it is named."""
    if device.index:
        _index(device)


def synchronize(device: torch.device | str | int | None = None) -> None:
    """Wait for everything submitted to the server: this thread's pending program runs, then every
    run submitted without waiting (``genie.compile`` replays, ``execute(fetch=False)``) has its
    reply. Their failures surface where their values are read, not here."""
    _index(device)
    rec = current_recorder()
    if rec.mode == "device" and rec.pending:
        rec.flush()
    wait = getattr(backend(), "synchronize", None)
    if wait is not None:  # in process, a submitted run has finished when submit returns
        wait()


def is_available() -> bool:
    """Whether the server answers (``GENIE_SERVER``/``genie.connect``; unset, the embedded one,
    started on this first use). Never raises: a server that cannot be reached is False."""
    try:
        b = backend()
    except GenieError:  # no backend here (inside a genie server)
        return False
    if b is _answered():
        return True
    ask = getattr(b, "server_stats", None)
    if ask is None:  # in process: the executor is here
        return True
    try:
        ask()
    except (GenieError, OSError):
        return False
    _remember(b)
    return True


def get_device_properties(device: torch.device | str | int | None = None) -> DeviceProperties:
    r = _report(device)
    return DeviceProperties(str(r["device_name"]), torch.device(r["device"]).type, int(r["total_memory"]))


_answered = lambda: None  # noqa: E731 -- the backend that last answered is_available (a weakref)


def _remember(b: object) -> None:
    global _answered
    _answered = weakref.ref(b)


def _index(device: torch.device | str | int | None) -> int:
    """The logical index ``device`` names, checked as ``torch.cuda`` checks its own."""
    if device is None:
        return 0
    d = torch.device(DEVICE_TYPE, device) if isinstance(device, int) else torch.device(device)
    if d.type != DEVICE_TYPE:
        raise ValueError(f"expected a {DEVICE_TYPE} device, got {d}")
    index = d.index or 0
    count = device_count()
    if not 0 <= index < count:
        raise ValueError(f"invalid device index {index}: {DEVICE_TYPE} has {count} device(s), one per "
                         f"connected genie server ({_servers()}); genie.connect([...]) adds more")
    return index


def _report(device: torch.device | str | int | None) -> dict:
    """The server's own report (its ``stats`` message): device, name and memory figures."""
    index = _index(device)
    b = backend()
    ask = getattr(b, "server_stats", None)
    if ask is None:
        raise NotImplementedError(f"torch.{DEVICE_TYPE}'s memory and device queries ask the genie server, "
                                  "and in process (GENIE_SERVER=inprocess) there is none")
    return ask(index) if index else ask()


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
    check_device(device)
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
        device = torch.device(kwargs["device"])
        check_device(device)
        with rec.lock:
            nid = rec.new_id()
            node = rec.add(Node(nid, name, tuple(args), dict(kwargs), (m,), storages=(nid,),
                                module=module_path(), seed=seed))
            return wrap(rec, node, 0, m, device)

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


_host_pin_memory = torch.Tensor.pin_memory


def _pin_memory(self: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """``Tensor.pin_memory()`` with ``remote_accelerator`` as torch's accelerator (which a Python
    backend cannot give a pinned allocator). Pinned memory speeds up DMA to a local GPU; Genie's
    uploads cross the network from any host memory, so for Genie a pinned tensor is a host tensor:
    a copy in ordinary memory, or in CUDA's pinned memory when this machine has a GPU of its own
    (its copies are what the pin is for). A remote tensor cannot be pinned, as a CUDA one cannot."""
    if isinstance(self, LazyTensor):
        raise RuntimeError(f"cannot pin a '{self.device}' tensor: only CPU tensors can be pinned")
    if device is not None and torch.device(device).type != DEVICE_TYPE:
        return _host_pin_memory(self, device)  # torch's own path (and deprecation) for that device
    if torch.cuda.is_available():
        return torch.ops.aten._pin_memory.default(self, torch.device("cuda"))
    return self.clone()


_host_is_pinned = torch.Tensor.is_pinned


def _is_pinned(self: torch.Tensor, device: torch.device | str | None = None) -> bool:
    """False for a remote tensor, as for a CUDA one (asking the op would fetch its value); a host
    tensor asks CUDA when this machine has it, since that is who pins (above)."""
    if isinstance(self, LazyTensor):
        return False
    if device is None and torch.cuda.is_available():
        with warnings.catch_warnings():  # naming the device is deprecated, and the accelerator is ours
            warnings.simplefilter("ignore")
            return _host_is_pinned(self, "cuda")
    return _host_is_pinned(self) if device is None else _host_is_pinned(self, device)


_host_empty_cache = getattr(torch.accelerator, "empty_cache", None)


def _empty_cache() -> None:
    """``torch.accelerator.empty_cache()`` (accelerate calls it as it places each module): the
    caching allocator it asks for is the server's, which frees by itself; nothing is cached here."""
    current = torch.accelerator.current_accelerator()
    if (current is None or current.type != DEVICE_TYPE) and _host_empty_cache is not None:
        _host_empty_cache()


def _to_copy_across(inner: Callable) -> Callable:
    """``x.to("remote_accelerator:j")`` of a value on device i != j is recorded as any copy (the
    runtime moves it server to server when it runs); its result is on device j: ``.device`` is
    the truth."""
    def to_copy(func, args, kwargs):
        out = inner(func, args, kwargs)
        device = kwargs.get("device")
        if device is not None and isinstance(out, LazyTensor) and isinstance(args[0], LazyTensor):
            d = torch.device(device)
            if d.type == DEVICE_TYPE and (d.index or 0) != (out.device.index or 0):
                return wrap(out._rec, out._node, out._index, out._meta, d)
        return out

    return to_copy


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
    torch.Tensor.pin_memory = _pin_memory  # DataLoader(pin_memory=True) pins through it too
    torch.Tensor.is_pinned = _is_pinned
    if _host_empty_cache is not None:  # torch >= 2.8
        torch.accelerator.empty_cache = _empty_cache
    to_copy = torch.ops.aten._to_copy.default
    _lazy.SPECIAL[to_copy] = _to_copy_across(_lazy.SPECIAL[to_copy])
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
