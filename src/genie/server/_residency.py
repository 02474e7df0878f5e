"""What a server keeps between runs: a shared pool of constants, and each connection's residents.

Constants (weights) are content-addressed and shared by every connection, so a weight is uploaded
once per server. Under a memory limit the pool evicts the least recently used constant that no run
is using. Resident values (handles) belong to one connection, are never evicted, and are freed when
the client frees them or the connection closes. Both count towards the limit, and so do the
predicted peaks of the runs in progress (``run_reservation``); a frame that could never fit is
refused when its header arrives (``admit_frame``).
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from genie._errors import GenieError, RemoteMemoryError, RemoteProtocolError
from genie.transport import MissingOnServerError


class MissingConstantsError(MissingOnServerError):
    """A run named constants this server does not hold (never sent, or evicted): the client re-sends."""

    def __init__(self, digests: list[str]) -> None:
        super().__init__(digests)


class MissingScheduleError(MissingOnServerError):
    """A run named a stage schedule by a key this server does not hold: the client re-sends it."""

    def __init__(self, key: str) -> None:
        super().__init__([], key)



def storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class ConstantPool(Mapping[str, torch.Tensor]):
    """Device tensors by content digest, least recently used first. Thread-safe."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._data: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._pins: dict[str, int] = {}
        self.const_bytes = 0
        self.resident_bytes = 0
        self.reserved = 0  # uploads being stored
        self.running = 0  # predicted peaks of the runs in progress
        self.evictions = 0

    # -- Mapping, as the Interpreter reads it -----------------------------------------------------
    def __getitem__(self, digest: str) -> torch.Tensor:
        with self._lock:
            t = self._data[digest]
            self._data.move_to_end(digest)
            return t

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, digest: object) -> bool:
        return digest in self._data

    # -- residency ------------------------------------------------------------------------------
    def missing(self, digests: Sequence[str]) -> list[str]:
        return [d for d in digests if d not in self._data]

    def put(self, digest: str, host: torch.Tensor, to_device: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Store ``to_device(host)`` under ``digest`` unless it is there; makes room first."""
        n = host.numel() * host.element_size()
        with self._lock:
            if digest in self._data:
                self._data.move_to_end(digest)
                return
            self._make_room(n, "a constant")
            self.reserved += n
        try:
            t = to_device(host)
        except BaseException:
            with self._lock:
                self.reserved -= n
            raise
        with self._lock:
            self.reserved -= n
            if digest not in self._data:
                self._data[digest] = t
                self.const_bytes += n

    @contextlib.contextmanager
    def pinned(self, digests: Sequence[str]) -> Iterator[None]:
        """No eviction of ``digests`` inside; raises MissingConstantsError if some are absent."""
        with self._lock:
            absent = [d for d in dict.fromkeys(digests) if d not in self._data]
            if absent:
                raise MissingConstantsError(absent)
            for d in digests:
                self._pins[d] = self._pins.get(d, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for d in digests:
                    left = self._pins[d] - 1
                    if left:
                        self._pins[d] = left
                    else:
                        del self._pins[d]

    def discard(self, digest: str) -> None:
        """Drop ``digest`` (its data can no longer be trusted); runs holding it keep their tensor."""
        with self._lock:
            t = self._data.pop(digest, None)
            if t is not None:
                self.const_bytes -= t.numel() * t.element_size()

    def add_residents(self, n: int) -> None:
        """Count ``n`` more resident bytes, evicting constants to stay under the limit."""
        with self._lock:
            self._make_room(n, "kept values")
            self.resident_bytes += n

    def drop_residents(self, n: int) -> None:
        with self._lock:
            self.resident_bytes -= n

    def used(self) -> int:
        return self.const_bytes + self.resident_bytes + self.reserved + self.running

    def nbytes(self, digest: str) -> int:
        t = self._data.get(digest)
        return 0 if t is None else t.numel() * t.element_size()

    @contextlib.contextmanager
    def run_reservation(self, n: int) -> Iterator[None]:
        """Hold ``n`` bytes (a run's predicted peak) inside, evicting unpinned constants to make
        room; RemoteMemoryError naming the numbers when even that is not enough."""
        with self._lock:
            self._make_room(n, "a run's predicted peak")
            self.running += n
        try:
            yield
        finally:
            with self._lock:
                self.running -= n

    def admit_frame(self, n: int) -> None:
        """RemoteMemoryError unless a frame of ``n`` bytes could fit once every unpinned constant
        were evicted: checked when its header arrives, before its payload is buffered."""
        if self.limit is None:
            return
        with self._lock:
            if n > self.limit - self.resident_bytes - self.reserved - self.running - self._pinned_bytes():
                raise RemoteMemoryError(self._refusal(n, "an incoming frame"))

    def _pinned_bytes(self) -> int:
        return sum(self.nbytes(d) for d in self._pins)

    def _refusal(self, n: int, what: str) -> str:
        return (f"{what} of {n} bytes does not fit under the server's memory limit of {self.limit} "
                f"bytes: {self.used()} in use, of which {self.const_bytes} constants (weights; "
                f"{self._pinned_bytes()} pinned by running programs), {self.resident_bytes} kept values "
                f"and {self.running + self.reserved} reserved by running programs and uploads; free "
                "tensors or raise --memory-limit")

    def _make_room(self, n: int, what: str = "data") -> None:
        if self.limit is None:
            return
        victims = (d for d in list(self._data) if d not in self._pins)
        while self.used() + n > self.limit:
            d = next(victims, None)
            if d is None:
                raise RemoteMemoryError(self._refusal(n, what))
            t = self._data.pop(d)
            self.const_bytes -= t.numel() * t.element_size()
            self.evictions += 1


_handles = itertools.count(random.randrange(1 << 32, 1 << 47))  # distinct across server restarts
NAME_MAX = 1 << 53  # client-chosen handles: exact in a JSON number (a double)


class Residents(dict[int, torch.Tensor]):
    """One connection's values kept between runs, by handle; counted in the pool's memory."""

    def __init__(self, pool: ConstantPool) -> None:
        super().__init__()
        self.pool = pool
        self._bytes: dict[int, int] = {}
        self._ptrs: dict[int, int] = {}  # storage address -> how many kept values share it
        self._ptr: dict[int, int] = {}  # handle -> its storage address
        # runs of one connection keep values from worker threads while the event loop frees others
        self._lock = threading.Lock()

    def keep(self, values: Sequence[torch.Tensor], names: Sequence[int] | None = None) -> list[int]:
        """Handles for ``values`` (``names``, the client's, when given: checked by ``check_names``);
        RemoteMemoryError (keeping none) when they cannot fit. A storage already kept counts once (a
        decode step keeps views of its cache: O(kept), not O(held))."""
        with self._lock:
            seen = self._ptrs
            ptrs, sizes, new = [], [], set()
            for t in values:
                ptr = t.untyped_storage().data_ptr()
                sizes.append(0 if ptr in seen or ptr in new else storage_bytes(t))
                ptrs.append(ptr)
                new.add(ptr)
            self.pool.add_residents(sum(sizes))
            handles = []
            for i, (t, n, ptr) in enumerate(zip(values, sizes, ptrs, strict=True)):
                h = names[i] if names is not None else next(_handles)
                while names is None and h in self:  # a client may have named one of ours already
                    h = next(_handles)
                self._bytes[h] = n
                self._ptr[h] = ptr  # before the handle shows: the event loop may look it up
                self[h] = t
                seen[ptr] = seen.get(ptr, 0) + 1
                handles.append(h)
            return handles

    def check_names(self, names: object, n_keep: int,
                    in_use: Callable[[int], bool] | None = None) -> list[int] | None:
        """A run's client-chosen handles for its kept values (so the client can name them in later
        runs before this one's reply lands): distinct ints, none in use on this connection (by
        ``in_use``: a server with runs in progress asks what holds once the earlier ones are done).
        A bad list is the client's protocol error; a name in use fails only that run."""
        if names is None:
            return None
        if (type(names) is not list or len(names) != n_keep
                or any(type(h) is not int or not 0 < h < NAME_MAX for h in names)
                or len(set(names)) != len(names)):
            raise RemoteProtocolError(f"run message: names must be {n_keep} distinct ints in "
                                      f"(0, 2**53), one per kept value")
        taken = [h for h in names if (in_use or self.__contains__)(h)]
        if taken:
            raise GenieError(f"handle {taken[0]} is already in use on this connection (a client bug: "
                             "free it before naming a new value with it)")
        return names

    def free(self, handles: Sequence[int]) -> None:
        n = 0
        with self._lock:
            for h in handles:
                if self.pop(h, None) is not None:
                    n += self._bytes.pop(h)
                    ptr = self._ptr.pop(h)
                    if self._ptrs[ptr] == 1:
                        del self._ptrs[ptr]
                    else:
                        self._ptrs[ptr] -= 1
        self.pool.drop_residents(n)

    def storage(self, handle: int) -> int:
        """The storage address of a kept value: views kept under other handles share it."""
        return self._ptr[handle]

    def close(self) -> None:
        self.free(list(self))
