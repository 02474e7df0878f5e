"""Receive buffers that come back: a cache of host memory blocks for frame payloads.

Fresh memory costs a page fault per 4 KiB on first touch: 256 MiB took 48 ms to fault in, a third
of its loopback transfer time. So payload blocks are reused. A block is lent as a numpy view of it;
every tensor made from the payload keeps that view alive (through ``torch.frombuffer``'s buffer),
so the block returns to the cache only when the last of them is gone, never while one can see it.

A block comes back through a finalizer, which may run in any thread and inside any locked section
(a garbage-collection pass starts wherever Python allocates): it only appends the block to a queue,
never takes the lock, and the next ``allocate`` files what came back.
"""

from __future__ import annotations

import collections
import os
import threading
import weakref

import numpy as np

SMALL = 1 << 20  # below this, malloc's own free lists already reuse memory


def size_class(n: int) -> int:
    """``n`` rounded up to one of eight steps per power of two (at most 12.5% slack)."""
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


class BufferPool:
    def __init__(self, max_cached: int | None = None) -> None:
        if max_cached is None:
            max_cached = int(os.environ.get("GENIE_BUFFER_CACHE", str(1 << 30)))
        self.max_cached = max_cached
        self.cached = 0
        self._free: dict[int, list[np.ndarray]] = {}
        self._back: collections.deque[np.ndarray] = collections.deque()  # returned, not yet filed
        self._lock = threading.Lock()

    def allocate(self, n: int) -> memoryview:
        """A writable ``n``-byte buffer; its block is reused once nothing refers to it."""
        if n < SMALL or self.max_cached <= 0:
            return memoryview(np.empty(n, np.uint8))
        cls = size_class(n)
        with self._lock:
            self._file_returns()
            blocks = self._free.get(cls)
            block = blocks.pop() if blocks else None
            if block is not None:
                self.cached -= block.nbytes
        if block is None:
            block = np.empty(cls, np.uint8)
        lent = block[:n]
        weakref.finalize(lent, self._release, block).atexit = False
        return memoryview(lent)

    def _release(self, block: np.ndarray) -> None:
        self._back.append(block)  # deque.append is atomic: no lock, so no deadlock in a GC pass

    def _file_returns(self) -> None:
        while self._back:
            block = self._back.popleft()
            if self.cached + block.nbytes <= self.max_cached:
                self._free.setdefault(block.nbytes, []).append(block)
                self.cached += block.nbytes

    def clear(self) -> None:
        with self._lock:
            self._back.clear()
            self._free.clear()
            self.cached = 0
