"""Where the tensors live: the one interface between recording and execution.

The recorder calls a Backend synchronously; ``execute`` awaits one. The in-process backend runs the
server's interpreter in this process; the remote one speaks the wire protocol to ``genie serve``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from genie.graph import Graph, StageSchedule, TensorMeta


@dataclass(slots=True)
class RunResult:
    fetched: list[torch.Tensor]  # CPU copies of the outputs asked for by ``fetch``
    handles: list[int]  # executor handles of the outputs asked for by ``keep``
    metas: list[TensorMeta]  # their metadata (data-dependent shapes are learnt here)
    timeline: dict | None = None  # a staged, traced run: the executor's timeline, on this clock
    arrived: dict[int, int] = field(default_factory=dict)  # fetch position -> perf_counter_ns here


@dataclass
class Stats:
    bytes_sent: int = 0
    bytes_received: int = 0
    round_trips: int = 0
    runs: int = 0
    uploads: int = 0
    uploads_skipped: int = 0
    template_hits: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


class Backend(Protocol):
    """``stages``: run stage by stage (outputs come back as their stage ends); ``stream``: input
    positions to send after the run, in that order; ``trace``: return the executor's timeline."""

    stats: Stats

    def run(self, graph: Graph, inputs: Sequence[torch.Tensor], *, fetch: Sequence[int],
            keep: Sequence[int], constants: dict[str, torch.Tensor], stages: StageSchedule | None = None,
            stream: Sequence[int] = (), trace: bool = False) -> RunResult: ...

    async def run_async(self, graph: Graph, inputs: Sequence[torch.Tensor], *, fetch: Sequence[int],
                        keep: Sequence[int], constants: dict[str, torch.Tensor],
                        stages: StageSchedule | None = None, stream: Sequence[int] = (),
                        trace: bool = False) -> RunResult: ...

    def submit(self, graph: Graph, inputs: Sequence[torch.Tensor], *, keep: Sequence[int],
               constants: dict[str, torch.Tensor], stages: StageSchedule | None = None,
               stream: Sequence[int] = ()) -> list[int]:
        """A run that fetches nothing: its kept values' handles, without waiting for it."""
        ...

    async def fetch_async(self, handles: Sequence[int]) -> list[torch.Tensor]: ...

    def free(self, handle: int) -> None: ...


_factory: Callable[[], Backend] | None = None
_backend: Backend | None = None
_lock = threading.Lock()


def set_backend_factory(factory: Callable[[], Backend]) -> None:
    """Called once by ``genie/__init__``: the composition root picks the default backend."""
    global _factory
    _factory = factory


def set_backend(b: Backend | None) -> None:
    global _backend
    with _lock:
        _backend = b


def backend() -> Backend:
    global _backend
    b = _backend
    if b is None:
        with _lock:
            if _backend is None:
                if _factory is None:
                    raise RuntimeError("genie has no backend: import genie, not a submodule alone")
                _backend = _factory()
            b = _backend
    return b
