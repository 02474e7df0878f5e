"""Inputs of one run that arrive in their own frames after it, while its first stages compute.

The receive task puts each one here as it lands; the worker thread running the program waits for
an input only when the first stage that reads it starts. Shared by one event loop and one worker
thread, so it uses a condition variable, and ``abort`` wakes a waiter when the connection ends.
A client that announces inputs and never sends them gets StreamTimeoutError after ``timeout``
seconds without a new one, so a stalled run gives its worker thread back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from genie._errors import ConnectionLostError, GenieError, RemoteProtocolError


class StreamTimeoutError(GenieError):
    """A run's streamed input did not arrive in time: the client announced it and stalled."""


class Inbound:
    def __init__(self, positions: list[int], timeout: float = float("inf")) -> None:
        if len(set(positions)) != len(positions) or any(p < 0 for p in positions):
            raise RemoteProtocolError("run message: 'stream' must list distinct input positions")
        self.positions = frozenset(positions)
        self.tensors: dict[int, torch.Tensor] = {}
        self.received: list[list] = []  # ["receive input 3", start_ns, end_ns], for the timeline
        self.run_done = False  # the run finished (or failed): drop this once every input is in
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self.timeout = timeout
        self._last = time.monotonic()  # when the run came, or its last input did

    @property
    def complete(self) -> bool:
        return len(self.tensors) == len(self.positions)

    def arrive(self, pos: int, t: torch.Tensor, started_ns: int, ended_ns: int) -> None:
        if pos not in self.positions or pos in self.tensors:
            raise RemoteProtocolError(f"input frame for position {pos}, which the run did not stream "
                                      "or which already arrived")
        with self._cond:
            self.tensors[pos] = t
            self._last = time.monotonic()
            self.received.append([f"receive input {pos}", started_ns, ended_ns])
            self._cond.notify_all()

    def wait(self, pos: int, on_block: Callable[[], Callable[[], None]] | None = None) -> torch.Tensor:
        """Input ``pos``, once it is here. If it is not yet, ``on_block()`` runs first and the
        function it returns runs after the wait (the caller lends its compute slot meanwhile)."""
        with self._cond:
            if pos in self.tensors or self._error is not None:
                return self._take(pos)
        resume = on_block() if on_block is not None else None
        try:
            with self._cond:
                while pos not in self.tensors and self._error is None:
                    left = self._last + self.timeout - time.monotonic()
                    if left <= 0:
                        raise StreamTimeoutError(
                            f"streamed input {pos} did not arrive within {self.timeout:g} s of the run or "
                            "its previous input (--stream-timeout): the client stalled")
                    self._cond.wait(min(left, 3600.0))
                return self._take(pos)
        finally:
            if resume is not None:
                resume()

    def _take(self, pos: int) -> torch.Tensor:
        if pos in self.tensors:
            return self.tensors[pos]
        raise self._error or ConnectionLostError("streamed input never arrived")

    def abort(self, exc: BaseException) -> None:
        """No more frames will come (the connection is ending): fail whoever waits."""
        with self._cond:
            self._error = exc
            self._cond.notify_all()
