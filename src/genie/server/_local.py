"""The in-process backend: the server's Store and Interpreter, without a wire in between.

Constants the program writes get private copies per node, as on a server (``run_job``): here a
constant may even be the user's own CPU tensor, which a write must never reach.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import trio

from genie.graph import Graph, StageSchedule
from genie.runtime import RunResult, Stats
from genie.server._job import private_constants, written_sources
from genie.server._session import Store


class LocalBackend:
    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.store = Store(torch.device(device))
        self.stats = Stats()
        self._lock = threading.Lock()

    def run(self, graph: Graph, inputs: Sequence[torch.Tensor], *, fetch: Sequence[int],
            keep: Sequence[int], constants: dict[str, torch.Tensor], stages: StageSchedule | None = None,
            stream: Sequence[int] = (), trace: bool = False) -> RunResult:
        """``stream`` has nothing to overlap in process: every input is here already."""
        with self._lock:
            for d in self.store.missing(list(constants)):
                self.store.put_constant(d, constants[d])
            written, _ = written_sources(graph)
            clones: dict[str, torch.Tensor] = {}
            if written:
                graph, clones = private_constants(graph, written, self.store.constants)
            self.store.constants.update(clones)  # under their own keys, for this run only
            try:
                fetched, handles, metas, timeline = self.store.run(graph, inputs, fetch=fetch, keep=keep,
                                                                   stages=stages, trace=trace)
            finally:
                for key in clones:
                    del self.store.constants[key]
            self.stats.runs += 1
            # .cpu() of a CPU value would alias executor memory the next run may mutate
            fetched = [t.detach().to("cpu", copy=True) for t in fetched]
            return RunResult(fetched, handles, metas, timeline.to_wire() if timeline is not None else None)

    async def run_async(self, graph: Graph, inputs: Sequence[torch.Tensor], *, fetch: Sequence[int],
                        keep: Sequence[int], constants: dict[str, torch.Tensor],
                        stages: StageSchedule | None = None, stream: Sequence[int] = (),
                        trace: bool = False) -> RunResult:
        return await trio.to_thread.run_sync(
            lambda: self.run(graph, inputs, fetch=fetch, keep=keep, constants=constants, stages=stages,
                             trace=trace))

    def free(self, handle: int) -> None:
        self.store.free([handle])
