"""Random ops, each drawn from a generator of its own run: a run's random values depend on its
seed alone, never on what other runs draw meanwhile.

The client gives every random node a seed (``Node.seed``). How the op is called with it, by what its
schema offers (``seeded_call``, worked out once per op):

- a ``generator`` argument: a fresh ``torch.Generator`` seeded with it (``rand.generator``,
  ``normal_``, ``bernoulli_``, ``multinomial``, ...);
- a twin overload that takes one (``rand.default`` -> ``rand.generator``, ``randint.low`` ->
  ``randint.low_generator``): the twin, with that generator;
- ``DECOMPOSED``: ops with no generator anywhere that real models run (``native_dropout``, which
  every ``nn.Dropout`` in training reaches), rewritten over ops that take one;
- anything else (attention or RNN kernels with dropout inside): the process's default generator,
  seeded under ``GLOBAL_RNG``, a lock every such call holds from its seed to its last draw, with the
  state saved and restored around it (``fork_rng``). Those calls run one at a time.

A random node without a seed (a raw client's) gets a fresh one from the OS: it must not use the
default generator unlocked, where it would move another run's draws.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from genie.graph import overload, registry

GLOBAL_RNG = threading.Lock()  # held by every call that draws from the default generator

SeededCall = Callable[[Callable, torch.device, int, list, dict], Any]


def native_dropout(fn: Callable, gen: torch.Generator, args: list, kwargs: dict) -> Any:
    """``native_dropout(input, p, train)`` as torch's own decomposition, with ``gen`` for the mask."""
    names = ("input", "p", "train")
    bound = {**dict(zip(names, args, strict=False)), **kwargs}
    x, p, train = bound["input"], bound["p"], bound.get("train")
    if train is False or p == 0 or not x.is_floating_point() or p >= 1:
        return fn(*args, **kwargs)  # no draw: the identity, or all dropped
    mask = torch.empty_like(x).uniform_(0, 1, generator=gen) > p
    return x * mask * (1.0 / (1.0 - p)), mask


# op name -> its rewrite over generator-taking ops: (the op, its generator, args, kwargs) -> result
DECOMPOSED: dict[str, Callable[[Callable, torch.Generator, list, dict], Any]] = {
    "aten.native_dropout.default": native_dropout,
}


def is_seeded(fn: Callable) -> bool:
    """Whether ``fn`` draws random numbers: tagged so, or taking a generator."""
    if torch.Tag.nondeterministic_seeded in getattr(fn, "tags", ()):
        return True
    schema = getattr(fn, "_schema", None)
    return schema is not None and any(a.name == "generator" for a in schema.arguments)


def _with_generator(fn: Callable, device: torch.device, seed: int, args: list, kwargs: dict) -> Any:
    kwargs["generator"] = torch.Generator(device).manual_seed(seed)
    return fn(*args, **kwargs)


def _under_lock(fn: Callable, device: torch.device, seed: int, args: list, kwargs: dict) -> Any:
    devices = [device] if device.type == "cuda" else []
    with GLOBAL_RNG, torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return fn(*args, **kwargs)


def _twin(op: str) -> torch._ops.OpOverload | None:
    """The overload of ``op``'s packet that takes exactly its arguments plus a generator, in the
    same positions (a generator is keyword-only wherever torch adds one)."""
    ns, packet, _ = op.split(".")
    args = overload(registry()[op])._schema.arguments
    positional = [a.name for a in args if not a.kwarg_only]
    names = {a.name for a in args} | {"generator"}
    for name, parts in registry().items():
        if name.startswith(f"{ns}.{packet}.") and name != op:
            other = overload(parts)._schema.arguments
            if ({a.name for a in other} == names and any(a.name == "generator" for a in other)
                    and [a.name for a in other if not a.kwarg_only] == positional):
                return overload(parts)
    return None


@cache
def seeded_call(op: str) -> SeededCall:
    """How to call random op ``op`` (a registry name) with a run's seed: see the module docstring."""
    fn = overload(registry()[op])
    if any(a.name == "generator" for a in fn._schema.arguments):
        return lambda f, device, seed, args, kwargs: _with_generator(f, device, seed, args, kwargs)
    twin = _twin(op)
    if twin is not None:
        return lambda f, device, seed, args, kwargs: _with_generator(twin, device, seed, args, kwargs)
    rewrite = DECOMPOSED.get(op)
    if rewrite is not None:
        return lambda f, device, seed, args, kwargs: rewrite(f, torch.Generator(device).manual_seed(seed),
                                                             args, kwargs)
    return _under_lock


def call_seeded(op: str, fn: Callable, device: torch.device, seed: int | None, args: list,
                kwargs: dict) -> Any:
    """``fn(*args, **kwargs)`` drawing from ``seed`` alone (a fresh one when None)."""
    if seed is None:
        seed = secrets.randbits(62)
    return seeded_call(op)(fn, device, seed, args, kwargs)
