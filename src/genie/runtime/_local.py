"""The in-process backend: an executor in this process, without a wire in between.

runtime/ may not import server/ (``server/`` shares only ``graph/`` and ``transport/`` with the
client), so the executor is injected: ``genie._setup``, the composition root, registers the server's
``InProcessExecutor`` as the factory (``set_executor_factory``). Constants the program writes get
private copies per node, as on a server: here a constant may even be the user's own CPU tensor,
which a write must never reach.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import trio

from genie.graph import Graph, StageSchedule, TensorMeta
from genie.runtime._backend import RunResult, Stats


class Executor(Protocol):
    """What LocalBackend runs on: constants by digest, values kept by handle, and runs."""

    def missing(self, digests: Sequence[str]) -> list[str]: ...

    def put_constant(self, digest: str, t: torch.Tensor) -> None: ...

    def run(self, graph: Graph, inputs: Sequence[torch.Tensor], *, fetch: Sequence[int], keep: Sequence[int],
            stages: StageSchedule | None = None, trace: bool = False,
            ) -> tuple[list[torch.Tensor], list[int], list[TensorMeta], dict | None]: ...

    def fetch(self, handles: Sequence[int]) -> list[torch.Tensor]: ...

    def free(self, handles: Sequence[int]) -> None: ...


_executor_factory: Callable[[torch.device], Executor] | None = None


def set_executor_factory(factory: Callable[[torch.device], Executor]) -> None:
    """Called once by ``genie._setup``: what ``LocalBackend(device)`` runs on by default."""
    global _executor_factory
    _executor_factory = factory


class LocalBackend:
    def __init__(self, device: str | torch.device = "cpu", executor: Executor | None = None) -> None:
        if executor is None:
            if _executor_factory is None:
                raise RuntimeError("LocalBackend has no executor: import genie, not a submodule alone")
            executor = _executor_factory(torch.device(device))
        self.executor = executor
        self.stats = Stats()
        self._lock = threading.Lock()
        self._frees: list[int] = []  # handles let go while a run held the executor

    def run(self, graph: Graph, inputs: Sequence[torch.Tensor], *, fetch: Sequence[int],
            keep: Sequence[int], constants: dict[str, torch.Tensor], stages: StageSchedule | None = None,
            stream: Sequence[int] = (), trace: bool = False) -> RunResult:
        """``stream`` has nothing to overlap in process: every input is here already."""
        with self._lock:
            for d in self.executor.missing(list(constants)):
                self.executor.put_constant(d, constants[d])
            try:
                fetched, handles, metas, timeline = self.executor.run(graph, inputs, fetch=fetch, keep=keep,
                                                                      stages=stages, trace=trace)
            finally:
                self._drain()
            self.stats.runs += 1
            # .cpu() of a CPU value would alias executor memory the next run may mutate
            fetched = [t.detach().to("cpu", copy=True) for t in fetched]
            return RunResult(fetched, handles, metas, timeline)

    async def run_async(self, graph: Graph, inputs: Sequence[torch.Tensor], *, fetch: Sequence[int],
                        keep: Sequence[int], constants: dict[str, torch.Tensor],
                        stages: StageSchedule | None = None, stream: Sequence[int] = (),
                        trace: bool = False) -> RunResult:
        return await trio.to_thread.run_sync(
            lambda: self.run(graph, inputs, fetch=fetch, keep=keep, constants=constants, stages=stages,
                             trace=trace))

    def submit(self, graph: Graph, inputs: Sequence[torch.Tensor], *, keep: Sequence[int],
               constants: dict[str, torch.Tensor], stages: StageSchedule | None = None,
               stream: Sequence[int] = ()) -> list[int]:
        """In process there is no reply to wait for: the run is done when this returns."""
        return self.run(graph, inputs, fetch=(), keep=keep, constants=constants, stages=stages).handles

    async def fetch_async(self, handles: Sequence[int]) -> list[torch.Tensor]:
        with self._lock:
            values = self.executor.fetch(list(handles))
            return [t.detach().to("cpu", copy=True) for t in values]

    def free(self, handle: int) -> None:
        """Called by finalizers, so also from inside a run (the garbage collector runs anywhere):
        a run in progress may still read the value, so the handle is freed when the run ends."""
        self._frees.append(handle)
        if self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        """Free the handles let go so far (the lock is held)."""
        while self._frees:
            self.executor.free([self._frees.pop()])
