"""What an executor holds for its clients: content-addressed constants and resident values."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from genie.graph import Graph, StageSchedule, TensorMeta
from genie.server._interpreter import Interpreter, own_storage
from genie.server._staged import StagedInterpreter, Timeline


class Store:
    """Device tensors by content digest (weights) and by handle (values kept between runs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.constants: dict[str, torch.Tensor] = {}
        self.residents: dict[int, torch.Tensor] = {}
        self._handles = itertools.count(1)

    def missing(self, digests: Sequence[str]) -> list[str]:
        return [d for d in digests if d not in self.constants]

    def put_constant(self, digest: str, t: torch.Tensor) -> None:
        if digest not in self.constants:
            self.constants[digest] = own_storage(t.to(self.device))

    def run(self, graph: Graph, inputs: Sequence[torch.Tensor], *, fetch: Sequence[int],
            keep: Sequence[int], stages: StageSchedule | None = None, trace: bool = False,
            ) -> tuple[list[torch.Tensor], list[int], list[TensorMeta], Timeline | None]:
        """Run (stage by stage with ``stages``); return fetched values (on device), handles and metas
        of kept ones, and the staged run's timeline if ``trace``."""
        timeline = None
        if stages is None:
            values = Interpreter(graph, device=self.device, constants=self.constants,
                                 residents=self.residents).run(inputs)
        else:
            layout = stages.check(graph)
            graph.check_inputs(inputs)
            interp = StagedInterpreter(graph, stages, device=self.device, constants=self.constants,
                                       residents=self.residents, meter=trace, layout=layout)
            values = interp.run(inputs)
            timeline = interp.timeline if trace else None
        handles, metas = [], []
        for i in keep:
            h = next(self._handles)
            self.residents[h] = values[i]
            handles.append(h)
            metas.append(TensorMeta.of(values[i]))
        return [values[i] for i in fetch], handles, metas, timeline

    def fetch(self, handle: int) -> torch.Tensor:
        return self.residents[handle]

    def free(self, handles: Sequence[int]) -> None:
        for h in handles:
            self.residents.pop(h, None)
