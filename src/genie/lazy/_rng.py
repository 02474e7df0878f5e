"""The remote RNG: each random op carries a seed drawn from it, so runs repeat under
``torch.manual_seed`` (which seeds it, through the device module)."""

from __future__ import annotations

import threading


class _RemoteRNG:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seed(67280421310721)  # torch's CPU default, so runs repeat without a seed call too

    def seed(self, s: int) -> None:
        with self.lock:
            self.base, self.count = int(s), 0

    def next_seed(self) -> int:
        with self.lock:
            self.count += 1
            return (self.base * 6364136223846793005 + self.count * 1442695040888963407) % (1 << 63)


RNG = _RemoteRNG()
