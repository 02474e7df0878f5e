"""What a server keeps between runs: a shared pool of constants, and each connection's residents.

Constants (weights) are content-addressed and shared by every connection, so a weight is uploaded
once per server. Under a memory limit the pool evicts the least recently used constant that no run
is using. Resident values (handles) belong to one connection, are never evicted, and are freed when
the client frees them or the connection closes.

Everything the server holds counts towards the limit, by storage, and is counted while it is held:

- constants, each in a storage of its own (a small one is copied out of the frame it came in, so
  a 4-byte constant never holds a 48 MiB receive block);
- kept values, once per distinct storage they hold, however many views of it are kept and for as
  long as any is (a kept 1-element view of a freed value counts its whole storage);
- the predicted peaks of the runs in progress (``run_reservation``);
- received frames: a payload is reserved when its header arrives (``hold_frame``, refused before a
  byte is buffered when it cannot fit) and counted until the last tensor or view of it is gone.
  A constant or kept value that is most of its frame adopts the frame (its bytes move over, none
  counted twice); one that is a smaller part of it is copied out, so that it never holds the
  rest (``frame_holding``). On the CPU a run's inputs are such views: the predicted peak leaves
  them out, the frame counts them;
- replies queued to send (``hold_replies``), by storage.

Going over the limit fails the request that would (a frame, a run, a keep) with RemoteMemoryError.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import contextvars
import ctypes
import gc
import itertools
import random
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

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


def held_bytes(buffers: Iterable[object]) -> int:
    """Bytes a message's buffers hold: each distinct tensor storage once, plus raw bytes."""
    seen: set[int] = set()
    n = 0
    for b in buffers:
        if isinstance(b, torch.Tensor):
            ptr = b.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                n += storage_bytes(b)
        elif b is not None:
            n += memoryview(b).nbytes  # type: ignore[arg-type]
    return n


class _Reservation:
    """What is left of a run's reserved peak (see ``run_reservation``)."""

    __slots__ = ("left",)

    def __init__(self, n: int) -> None:
        self.left = n


_RUN: contextvars.ContextVar[_Reservation | None] = contextvars.ContextVar("genie_run", default=None)


class _Frame:
    """A received payload block being counted: its bytes, and the finalizer that stops counting."""

    __slots__ = ("address", "counted", "nbytes", "watch")

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.address = 0
        self.counted = True
        self.watch: weakref.ref | None = None  # on the block: its callback uncounts this frame


class ConstantPool(Mapping[str, torch.Tensor]):
    """Device tensors by content digest, least recently used first, and the count of every byte the
    server holds (see the module docstring). Thread-safe."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._data: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._sizes: dict[str, int] = {}  # digest -> the bytes of its storage, as counted
        self._pins: dict[str, int] = {}
        self._frames: dict[int, _Frame] = {}  # block address -> a received payload still counted
        self._starts: list[int] = []  # their addresses, sorted (which frame holds an address)
        # frames whose last view is gone, to uncount: a finalizer may run in any thread, inside
        # any locked section (a GC pass), so it never takes the lock; whoever next does, uncounts
        self._gone: collections.deque[_Frame] = collections.deque()
        self._watched: dict[int, _Frame] = {}  # id of a weak reference to each block -> its frame
        self._frame_bytes = 0
        self.const_bytes = 0
        self.resident_bytes = 0
        self.reserved = 0  # uploads being stored
        self.running = 0  # predicted peaks of the runs in progress
        self.reply_bytes = 0  # replies queued to send
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
    def peek(self, digest: str) -> torch.Tensor | None:
        """The constant under ``digest``, if held, without touching the eviction order."""
        return self._data.get(digest)

    def missing(self, digests: Sequence[str]) -> list[str]:
        return [d for d in digests if d not in self._data]

    def put(self, digest: str, host: torch.Tensor, to_device: Callable[[torch.Tensor], torch.Tensor], *,
            adopt: bool = False) -> None:
        """Store ``to_device(host)`` under ``digest`` unless it is there; makes room first. With
        ``adopt``, a ``host`` that is most of a received payload is stored as it is, its frame's
        bytes becoming the constant's (no copy, nothing counted twice)."""
        n = host.numel() * host.element_size()
        with self._lock:
            if digest in self._data:
                self._data.move_to_end(digest)
                return
            self._reap()
            frame = self._frame_holding(host)[0] if adopt else None
            if frame is not None and host.nbytes * 2 > frame.nbytes:  # its frame becomes the constant
                self._stop_counting(frame)
                self._data[digest], self._sizes[digest] = host, frame.nbytes
                self.const_bytes += frame.nbytes
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
                self._data[digest], self._sizes[digest] = t, storage_bytes(t)
                self.const_bytes += self._sizes[digest]

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
            if self._data.pop(digest, None) is not None:
                self.const_bytes -= self._sizes.pop(digest)

    def add_residents(self, n: int, adopt: Sequence[_Frame] = ()) -> None:
        """Count ``n`` more resident bytes, evicting constants to stay under the limit; the bytes of
        the received frames ``adopt`` (kept values that are most of them), and inside a run's
        reservation what is left of it, move over instead of needing room."""
        run = _RUN.get()
        with self._lock:
            self._reap()
            frames = {id(f): f for f in adopt if f.counted}
            moved = sum(f.nbytes for f in frames.values())
            reserved = min(run.left, max(0, n - moved)) if run is not None else 0
            self._make_room(max(0, n - moved - reserved), "kept values")
            for f in frames.values():
                self._stop_counting(f)
            if run is not None:
                run.left -= reserved
                self.running -= reserved
            self.resident_bytes += n

    def drop_residents(self, n: int) -> None:
        with self._lock:
            self.resident_bytes -= n

    def used(self) -> int:
        """Every byte counted (under the lock: frames gone meanwhile are uncounted first)."""
        self._reap()
        return (self.const_bytes + self.resident_bytes + self.reserved + self.running + self._frame_bytes
                + self.reply_bytes)

    def nbytes(self, digest: str) -> int:
        return self._sizes.get(digest, 0)

    @contextlib.contextmanager
    def run_reservation(self, n: int) -> Iterator[None]:
        """Hold ``n`` bytes (a run's predicted peak) inside, evicting unpinned constants to make
        room; RemoteMemoryError naming the numbers when even that is not enough. Values the run
        keeps are part of that peak: keeping them inside (in this context, which a worker thread
        inherits) moves their bytes over rather than counting them twice."""
        reservation = _Reservation(n)
        with self._lock:
            self._make_room(n, "a run's predicted peak")
            self.running += n
        token = _RUN.set(reservation)
        try:
            yield
        finally:
            _RUN.reset(token)
            with self._lock:
                self.running -= reservation.left

    # -- received frames and queued replies --------------------------------------------------------
    def hold_frame(self, n: int, allocate: Callable[[int], memoryview]) -> memoryview:
        """``allocate(n)``, a buffer for a frame's payload, counted from now until the last tensor or
        view of it is gone (or it is adopted). RemoteMemoryError, before a byte of it is buffered,
        when it does not fit even once every unpinned constant is evicted."""
        frame = _Frame(n)
        for attempt in range(2):
            try:
                with self._lock:
                    self._reap()
                    self._make_room(n, "an incoming frame")
                    self._frame_bytes += n
                break
            except RemoteMemoryError:
                if attempt or self.limit is None:
                    raise
                gc.collect()  # payloads held only by garbage (a failed run's traceback) go now
        try:
            view = allocate(n)
            block = view.obj
            frame.address = ctypes.addressof(ctypes.c_char.from_buffer(view))
            with self._lock:
                self._reap()
                old = self._frames.get(frame.address)
                if old is not None:  # its block is reused, so it is gone (its finalizer may be late)
                    self._uncount(old)
                self._frames[frame.address] = frame
                bisect.insort(self._starts, frame.address)
            frame.watch = weakref.ref(block, self._block_gone)
            self._watched[id(frame.watch)] = frame
        except BaseException:
            with self._lock:
                self._uncount(frame)
            raise
        return view

    @property
    def frame_bytes(self) -> int:
        """Bytes of received payloads still held."""
        if self._gone and self._lock.acquire(blocking=False):
            try:
                self._reap()
            finally:
                self._lock.release()
        return self._frame_bytes

    def _block_gone(self, watch: weakref.ref) -> None:
        """The callback of a frame's block: queued, never locked (see ``_gone``); uncounted now if
        nobody holds the lock."""
        frame = self._watched.pop(id(watch), None)
        if frame is None:
            return  # adopted: counted elsewhere
        self._gone.append(frame)
        if self._lock.acquire(blocking=False):
            try:
                self._reap()
            finally:
                self._lock.release()

    def _reap(self) -> None:
        """Uncount the frames whose last view is gone (under the lock)."""
        while self._gone:
            self._uncount(self._gone.popleft())

    def _uncount(self, frame: _Frame) -> None:
        if not frame.counted:
            return
        frame.counted = False
        if frame.watch is not None:
            self._watched.pop(id(frame.watch), None)
        self._frame_bytes -= frame.nbytes
        if self._frames.get(frame.address) is frame:
            del self._frames[frame.address]
            i = bisect.bisect_left(self._starts, frame.address)
            if i < len(self._starts) and self._starts[i] == frame.address:
                del self._starts[i]

    def _frame_holding(self, t: torch.Tensor) -> tuple[_Frame | None, int]:
        """(the counted frame whose payload ``t``'s storage lies in, or None; that storage's bytes),
        under the lock."""
        storage = t.untyped_storage()
        ptr, n = storage.data_ptr(), storage.nbytes()
        i = bisect.bisect_right(self._starts, ptr) - 1
        frame = self._frames.get(self._starts[i]) if i >= 0 and n else None
        return (frame if frame is not None and ptr + n <= frame.address + frame.nbytes else None), n

    def frame_holding(self, t: torch.Tensor) -> tuple[_Frame | None, bool]:
        """(the received frame ``t``'s storage is part of, or None; whether it is most of it, so
        that keeping it may adopt the frame rather than copy it out)."""
        with self._lock:
            self._reap()
            frame, n = self._frame_holding(t)
        return frame, frame is not None and n * 2 > frame.nbytes

    def _stop_counting(self, frame: _Frame) -> None:
        """``frame``'s bytes are counted elsewhere from now on (under the lock)."""
        self._uncount(frame)

    def hold_replies(self, n: int) -> None:
        """Count ``n`` bytes of queued replies. Never refused: a reply's values were counted in its
        run's reservation until now; constants are evicted to stay under the limit if they can be."""
        with self._lock:
            with contextlib.suppress(RemoteMemoryError):
                self._make_room(n)
            self.reply_bytes += n

    def drop_replies(self, n: int) -> None:
        with self._lock:
            self.reply_bytes -= n

    def _pinned_bytes(self) -> int:
        return sum(self.nbytes(d) for d in self._pins)

    def _refusal(self, n: int, what: str) -> str:
        return (f"{what} of {n} bytes does not fit under the server's memory limit of {self.limit} "
                f"bytes: {self.used()} in use, of which {self.const_bytes} constants (weights; "
                f"{self._pinned_bytes()} pinned by running programs), {self.resident_bytes} kept values, "
                f"{self.running + self.reserved} reserved by running programs and uploads, "
                f"{self._frame_bytes} received frames not yet done and {self.reply_bytes} replies not yet "
                "read by their clients; free tensors or raise --memory-limit")

    def _make_room(self, n: int, what: str = "data") -> None:
        if self.limit is None:
            return
        victims = (d for d in list(self._data) if d not in self._pins)
        while self.used() + n > self.limit:
            d = next(victims, None)
            if d is None:
                raise RemoteMemoryError(self._refusal(n, what))
            self._data.pop(d)
            self.const_bytes -= self._sizes.pop(d)
            self.evictions += 1


NAME_MAX = 1 << 53  # client-chosen handles: exact in a JSON number (a double)
# handles the server chooses (a run that names none) start past every name a client may choose, so
# a run's server-chosen handle can never be the name a pending run of the same connection gave
_handles = itertools.count(random.randrange(NAME_MAX, NAME_MAX << 4))  # distinct across restarts


class Residents(dict[int, torch.Tensor]):
    """One connection's values kept between runs, by handle; counted in the pool's memory by
    storage: each distinct storage once, for as long as any kept value is a view of it (freeing the
    value that brought it while a view of it stays kept leaves it counted: it is still held)."""

    def __init__(self, pool: ConstantPool) -> None:
        super().__init__()
        self.pool = pool
        self._storages: dict[int, list[int]] = {}  # storage address -> [kept values on it, its bytes]
        self._ptr: dict[int, int] = {}  # handle -> its storage address
        # runs of one connection keep values from worker threads while the event loop frees others
        self._lock = threading.Lock()

    def keep(self, values: Sequence[torch.Tensor], names: Sequence[int] | None = None) -> list[int]:
        """Handles for ``values`` (``names``, the client's, when given: checked by ``check_names``);
        GenieError if a name is in use after all, RemoteMemoryError (keeping none) when they cannot
        fit. A storage already kept counts once (a decode step keeps views of its cache: O(kept),
        not O(held)). A value on a received frame (an input kept as it is) adopts the frame when it
        is most of it, and is copied out of it otherwise (``_off_frames``)."""
        values, adopt = self._off_frames(values)
        with self._lock:
            if names is not None:
                taken = [h for h in names if h in self]
                if taken:  # never overwrite: the value it named would be held and counted for good
                    raise GenieError(f"handle {taken[0]} is already in use on this connection (a client "
                                     "bug: free it before naming a new value with it)")
            ptrs = [t.untyped_storage().data_ptr() for t in values]
            grow: dict[int, int] = {}  # storage -> bytes it adds (new, or a bigger one at an address)
            for t, ptr in zip(values, ptrs, strict=True):
                had = self._storages[ptr][1] if ptr in self._storages else 0
                n = adopt[ptr].nbytes if ptr in adopt else storage_bytes(t)
                if n > had + grow.get(ptr, 0):
                    grow[ptr] = n - had
            self.pool.add_residents(sum(grow.values()),
                                    adopt=[f for p, f in adopt.items() if p not in self._storages])
            handles = []
            for i, (t, ptr) in enumerate(zip(values, ptrs, strict=True)):
                h = names[i] if names is not None else next(_handles)
                while names is None and h in self:
                    h = next(_handles)
                entry = self._storages.setdefault(ptr, [0, 0])
                entry[0] += 1
                entry[1] += grow.pop(ptr, 0)
                self._ptr[h] = ptr  # before the handle shows: the event loop may look it up
                self[h] = t
                handles.append(h)
            return handles

    def _off_frames(self, values: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], dict[int, _Frame]]:
        """``values`` with each storage that is a small part of a received frame copied out (views
        of it rebuilt on the copy, so they still alias one another), and the frames to adopt, by
        storage address, for the storages that are most of theirs. Outside the lock: a copy may
        take a while, and the event loop frees under that lock."""
        out = list(values)
        adopt: dict[int, _Frame] = {}
        copies: dict[int, torch.UntypedStorage] = {}
        for i, t in enumerate(values):
            ptr = t.untyped_storage().data_ptr()
            if ptr in adopt:
                continue
            if ptr not in copies:
                frame, most = self.pool.frame_holding(t)
                if frame is None:
                    continue
                if most:
                    adopt[ptr] = frame
                    continue
                copies[ptr] = t.untyped_storage().clone()
            new = torch.empty(0, dtype=t.dtype, device=t.device)
            out[i] = new.set_(copies[ptr], t.storage_offset(), t.shape, t.stride())
        return out, adopt

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
                if self.pop(h, None) is None:
                    continue
                ptr = self._ptr.pop(h)
                entry = self._storages[ptr]
                entry[0] -= 1
                if not entry[0]:  # the last kept view of this storage: now it is let go
                    del self._storages[ptr]
                    n += entry[1]
        self.pool.drop_residents(n)

    def storage(self, handle: int) -> int:
        """The storage address of a kept value: views kept under other handles share it."""
        return self._ptr[handle]

    def close(self) -> None:
        self.free(list(self))
