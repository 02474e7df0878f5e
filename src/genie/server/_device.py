"""The server's accelerator: where payloads land, how they reach the device, how results come back.

On CUDA, frames are received into pinned host memory; host-to-device and device-to-host copies run
on a copy stream and programs on compute streams, one per worker (``--workers``: runs computing at
once), so one connection's upload overlaps another's compute and concurrent runs do not queue on
one stream. Each step ends synchronized: a thread that returns leaves no work in flight, so a value
made on one stream is safe to read on another. On the CPU every step is (almost) free: received
buffers already are the tensors, and there are no streams.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from genie.transport import BufferPool

T = TypeVar("T")


class Device:
    def __init__(self, device: str | torch.device, streams: int = 1) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pool = BufferPool()
        self._streams: queue.SimpleQueue = queue.SimpleQueue()  # compute streams not in use
        if self.cuda:
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
            self.copy_stream = torch.cuda.Stream(self.device)
            for _ in range(streams):  # one per compute slot; more are made if ever needed
                self._streams.put(torch.cuda.Stream(self.device))

    def __str__(self) -> str:
        return str(self.device)

    def allocate(self, n: int) -> memoryview:
        """A host buffer to receive ``n`` bytes into: pinned on CUDA (torch caches those blocks),
        reused from a pool on the CPU."""
        if self.cuda:
            return memoryview(torch.empty(n, dtype=torch.uint8, pin_memory=True).numpy())
        return self.pool.allocate(n)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return host
        return self.stage([host])[0]

    def stage(self, hosts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Host tensors onto the device, through the copy stream; blocks until they are there."""
        if not self.cuda:
            return list(hosts)
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
            out = [h.to(self.device, non_blocking=True) for h in hosts]
        self.copy_stream.synchronize()
        return out

    def compute(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on a compute stream of its own and wait for it."""
        if not self.cuda:
            return fn()
        try:
            stream = self._streams.get_nowait()
        except queue.Empty:  # a run waiting for a streamed input lent its slot, not its stream
            stream = torch.cuda.Stream(self.device)
        try:
            # worker threads start on cuda:0: name the device as well as the stream
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                out = fn()
            stream.synchronize()
        finally:
            self._streams.put(stream)
        return out

    def to_host(self, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Pinned host copies of device ``values``, to send (CPU values pass through)."""
        if not self.cuda:
            return list(values)
        running = torch.cuda.current_stream(self.device)  # inside ``compute``: this run's stream
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_stream(running)  # mid-run outputs: after their stage
            out = []
            for v in values:
                if v.device.type == "cpu":
                    out.append(v)
                    continue
                v = v.contiguous()
                h = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                h.copy_(v, non_blocking=True)
                out.append(h)
        self.copy_stream.synchronize()
        return out
