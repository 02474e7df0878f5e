"""The server's accelerator: where payloads land, how they reach the device, how results come back.

On CUDA, frames are received into pinned host memory; host-to-device and device-to-host copies run
on a copy stream and programs on a compute stream, so one connection's upload overlaps another's
compute. Each step ends synchronized: a thread that returns leaves no work in flight. On the CPU
every step is (almost) free: received buffers already are the tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from genie.transport import BufferPool

T = TypeVar("T")


class Device:
    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pool = BufferPool()
        if self.cuda:
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
            self.copy_stream = torch.cuda.Stream(self.device)
            self.compute_stream = torch.cuda.Stream(self.device)

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
        """Run ``fn`` on the compute stream and wait for it."""
        if not self.cuda:
            return fn()
        # worker threads start on cuda:0: name the device as well as the stream
        with torch.cuda.device(self.device), torch.cuda.stream(self.compute_stream):
            out = fn()
        self.compute_stream.synchronize()
        return out

    def to_host(self, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Pinned host copies of device ``values``, to send (CPU values pass through)."""
        if not self.cuda:
            return list(values)
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_stream(self.compute_stream)  # mid-run outputs: after their stage
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
