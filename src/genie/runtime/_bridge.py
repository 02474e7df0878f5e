"""The sync bridge: one trio event loop on a daemon thread, owning the process's connection.

The recorder calls the backend synchronously (``.cpu()``, ``.item()``), possibly from many threads;
``genie.execute`` and ``genie.fetch`` await it from the caller's own loop, trio's or asyncio's. Both
hand a coroutine function to this loop and wait for its outcome: ``call`` blocks a thread,
``call_async`` awaits across loops and carries cancellation over (the coroutine is cancelled in the
bridge, where it cleans up after itself). ``soon`` schedules a plain function there without
waiting (frees from finalizers).
``call_back`` is ``call``'s fast path for work that can start without awaiting: a plain function
runs in the loop and hands its outcome to a callback later (from a connection's reader, say), which
wakes the blocked thread directly: one hop in, one out, no task of the loop in between.
``paused`` lets a blocked caller borrow what the loop owns (a connection's socket, its session) while
the loop sleeps in its I/O wait: the loop does not run a task or a callback until the caller is done
(a blocking call then writes its frame and reads its reply itself, with no hop; ``runtime._direct``).
``in_thread`` is the other direction: blocking work (recording a step, waiting for a flush) on a
worker thread while the caller's own loop, trio's or asyncio's, awaits it and serves other tasks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import outcome
import sniffio
import trio

from genie._errors import ConnectionLostError

T = TypeVar("T")


class _Gate(trio.abc.Instrument):
    """Marks the loop idle as it goes into its I/O wait; coming out, it waits for a caller that
    borrowed its state meanwhile (``Bridge.paused``) before it runs anything."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def before_io_wait(self, timeout: float) -> None:
        self.bridge._idle = True

    def after_io_wait(self, timeout: float) -> None:
        with self.bridge._gate:  # a caller in ``paused`` holds it: wait for it
            self.bridge._idle = False


class Bridge:
    def __init__(self, name: str = "genie-bridge") -> None:
        self._gate = threading.Lock()
        self._idle = False  # between the loop's I/O wait and its check of the gate: nothing runs
        self._counting = threading.Lock()
        self._handed_in = 0  # ``soon`` calls not run yet
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    # -- the loop -------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            trio.run(self._amain)
        finally:
            self._token = None
            self._ready.set()

    async def _amain(self) -> None:
        trio.lowlevel.add_instrument(_Gate(self))
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    @property
    def alive(self) -> bool:
        return self._token is not None and self._thread.is_alive()

    def in_bridge(self) -> bool:
        return threading.current_thread() is self._thread

    def soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` in the bridge loop, later; False if the bridge is gone. Until it has
        run, ``paused`` says no: work handed in earlier goes first."""
        token = self._token
        if token is None:
            return False
        with self._counting:
            self._handed_in += 1
        try:
            token.run_sync_soon(self._run_handed_in, fn, args)
        except trio.RunFinishedError:
            self._ran_handed_in()
            return False
        return True

    def later(self, fn: Callable[..., Any], *args: Any) -> bool:
        """``soon``, for work that needs no place in line (a blocking call may go direct before it
        runs: ``paused`` does not wait for it)."""
        token = self._token
        if token is None:
            return False
        try:
            token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            return False
        return True

    def _run_handed_in(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            fn(*args)
        finally:
            self._ran_handed_in()

    def _ran_handed_in(self) -> None:
        with self._counting:
            self._handed_in -= 1

    def start_soon(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Start ``afn(*args)`` as a task of the bridge (from any thread)."""
        return self.soon(lambda: self._nursery.start_soon(afn, *args))  # type: ignore[union-attr]

    def close(self, timeout: float = 5.0) -> None:
        if self._stop is not None:
            self.soon(self._stop.set)
        if not self.in_bridge():
            self._thread.join(timeout)

    @contextlib.contextmanager
    def paused(self) -> Iterator[bool]:
        """Yields True when the loop sleeps in its I/O wait and stays there (running no task and no
        callback) until this block ends: what the loop owns may be used from this thread
        meanwhile, as long as nothing here calls into trio. Yields False when it is busy (or
        another thread has it paused, or work handed in with ``soon`` has not run yet: it goes
        first, so calls reach the loop in the order they were made): use the loop as usual. Keep
        the block short: the loop's other work waits for it."""
        if self.in_bridge() or not self._gate.acquire(blocking=False):
            yield False
            return
        try:
            yield self._idle and not self._handed_in and self.alive
        finally:
            self._gate.release()

    # -- calling in -----------------------------------------------------------------------------
    def call(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await afn(*args)`` in the bridge; blocks this (non-bridge) thread until it is done."""
        if self.in_bridge():
            raise RuntimeError("genie: a blocking call from inside its own background loop")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        scope = trio.CancelScope()

        async def runner() -> None:
            with scope:
                try:
                    fut.set_result(await afn(*args))
                except Exception as e:
                    fut.set_exception(e)
            if not fut.done():
                fut.set_exception(ConnectionLostError("genie's background loop was shut down"))

        if not self.start_soon(runner):
            raise ConnectionLostError("genie's background loop has stopped")
        try:
            while True:
                try:
                    return fut.result(timeout=1.0)
                except concurrent.futures.TimeoutError:
                    if not self.alive:
                        raise ConnectionLostError("genie's background loop has stopped") from None
        except BaseException:
            if not fut.done():  # KeyboardInterrupt and the like: stop the work in the bridge too
                self.soon(scope.cancel)
            raise

    def call_back(self, fn: Callable[..., Callable[[], None] | None], *args: Any) -> Any:
        """``fn(reply, *args)`` in the bridge, without a checkpoint; it (or what it arranges, later
        in the loop) calls ``reply(outcome)`` once, and this (non-bridge) thread, blocked until
        then, returns or raises that outcome. ``fn`` returns what stops its work (or None): called
        in the bridge if this thread stops waiting (KeyboardInterrupt)."""
        if self.in_bridge():
            raise RuntimeError("genie: a blocking call from inside its own background loop")
        woken = threading.Lock()
        woken.acquire()
        box: list[outcome.Outcome] = []
        stop: list[Callable[[], None] | None] = []

        def reply(result: outcome.Outcome) -> None:
            if not box:
                box.append(result)
                woken.release()

        def start() -> None:
            try:
                stop.append(fn(reply, *args))
            except Exception as e:
                reply(outcome.Error(e))

        if not self.soon(start):
            raise ConnectionLostError("genie's background loop has stopped")
        try:
            while not woken.acquire(timeout=1.0):
                if not self.alive:
                    raise ConnectionLostError("genie's background loop has stopped")
        except BaseException:
            if not box:  # stop the work in the bridge too (once it has started: soon is in order)
                self.soon(lambda: stop and stop[0] is not None and stop[0]())
            raise
        return box[0].unwrap()

    async def call_async(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await afn(*args)`` in the bridge from another event loop, trio's or asyncio's (told
        apart by sniffio); cancelling this cancels that, and the bridge cleans up after it."""
        if self.in_bridge():
            return await afn(*args)
        if sniffio.current_async_library() == "asyncio":
            return await self._call_from_asyncio(afn, *args)
        here = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[outcome.Outcome] = []
        scope = trio.CancelScope()

        async def runner() -> None:
            with scope:
                try:
                    box.append(outcome.Value(await afn(*args)))
                except Exception as e:
                    box.append(outcome.Error(e))
            with contextlib.suppress(trio.RunFinishedError):  # the caller's loop has ended
                here.run_sync_soon(done.set)

        if not self.start_soon(runner):
            raise ConnectionLostError("genie's background loop has stopped")
        try:
            while not done.is_set():
                with trio.move_on_after(1.0):
                    await done.wait()
                if not done.is_set() and not self.alive:
                    raise ConnectionLostError("genie's background loop has stopped")
        except BaseException:  # cancelled, or Ctrl-C in the caller's loop: stop the work in the bridge
            self.soon(scope.cancel)
            raise
        if not box:
            raise ConnectionLostError("genie's background loop was shut down")
        return box[0].unwrap()

    async def _call_from_asyncio(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        scope = trio.CancelScope()

        def settle(result: outcome.Outcome) -> None:
            if not fut.done():
                fut.set_result(result)

        async def runner() -> None:
            result: outcome.Outcome = outcome.Error(ConnectionLostError("genie's background loop was "
                                                                        "shut down"))
            with scope:
                try:
                    result = outcome.Value(await afn(*args))
                except Exception as e:
                    result = outcome.Error(e)
            with contextlib.suppress(RuntimeError):  # the caller's loop has closed
                loop.call_soon_threadsafe(settle, result)

        if not self.start_soon(runner):
            raise ConnectionLostError("genie's background loop has stopped")
        try:
            while True:
                done, _ = await asyncio.wait([fut], timeout=1.0)
                if done:
                    return fut.result().unwrap()
                if not self.alive:
                    raise ConnectionLostError("genie's background loop has stopped")
        except BaseException:  # CancelledError, KeyboardInterrupt: stop the work in the bridge too
            if not fut.done():
                self.soon(scope.cancel)
            raise


_CALLERS: concurrent.futures.ThreadPoolExecutor | None = None  # asyncio's side of ``in_thread``
_CALLERS_LOCK = threading.Lock()
CALL_THREADS = 32  # worker threads for asyncio callers (trio's own limiter serves trio callers)


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a worker thread while the calling event loop (trio or asyncio, told apart by
    sniffio) keeps running other tasks; returns or raises what ``fn`` did.

    Cancelling the await delivers the cancellation at once; ``fn`` cannot be interrupted, so it runs
    to its end in its thread and its result is dropped."""
    if sniffio.current_async_library() == "asyncio":
        global _CALLERS
        if _CALLERS is None:
            with _CALLERS_LOCK:  # not the loop's default executor: ours block on a recorder
                if _CALLERS is None:
                    _CALLERS = concurrent.futures.ThreadPoolExecutor(CALL_THREADS, "genie-call")
        return await asyncio.get_running_loop().run_in_executor(_CALLERS, functools.partial(fn, *args))
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
