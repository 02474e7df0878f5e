"""RemoteBackend: the Backend protocol spoken to a ``genie serve`` process, from any thread.

What goes on the wire for one run is the ``Session``'s (``_session``); this is when: runs posted in
the order they were made, from the caller's thread through the bridge loop, retried after an
eviction, and connections (re)made. Call tree::

    RemoteBackend.run(graph, inputs, fetch=, keep=, constants=)      sync: Bridge.call_back
      _start_run(...)        in the bridge loop, no checkpoint: connected, every big constant on
                             the server and no earlier run still on its way out -> post_run at
                             once; the reader builds the result (Session.result) and wakes the caller;
                             else (or a constant evicted) _run
    RemoteBackend.submit(graph, inputs, keep=, constants=) -> handles    sync, returns at once:
      _start_submit(...)     the same in the bridge, nobody waits: the reply is checked as it
                             lands (_settle_submit); a failure marks its handles failed, and a
                             later run or fetch that reads one raises that failure
    await RemoteBackend.fetch_async(handles)                         any loop: ``fetch`` messages
    await RemoteBackend.run_async(...)                               any trio loop: same, multiplexed
      _run(...)                                        in the bridge loop
        _connect()           first use, or after a loss: a new connection and a new Session
        sess.ensure_constants()   has -> upload what the server lacks
        sess.post_run()      (holding the post order, so runs reach the server in the order they
                             were made: a run may read the handles an earlier one names)
        wait                 -> sess.result(): a RunResult; server errors raise their Genie
                             exception; constants or a schedule evicted meanwhile -> send again
                             and retry
    free(handle)             any thread (finalizers): one hop into the loop per batch; they ride
                             on the next run, or go alone after the connection's FREE_DELAY

Handles are named here (``names`` in the run message), so a run's kept values can be read by the
next run before its reply lands: the server runs them in order.

Residency (``GENIE_RESIDENCY``, default 1): constants are uploaded by content digest only when the
server lacks them, and graphs run from the server's template cache. With ``GENIE_RESIDENCY=0`` every
run re-sends every constant and the whole graph: the naive baseline the benchmarks compare against.
(Values a run keeps, such as a KV cache, stay on the server either way: the recorder asks for that.)

Environment:
    GENIE_SERVER=host:port     use that server (GENIE_TOKEN: its token); unset: an embedded server;
                               ``inprocess``: no server at all (genie._setup picks LocalBackend)
    GENIE_TLS=1 | ca.pem       speak TLS to GENIE_SERVER, verified against the system's CAs or that
                               CA bundle (see ``connect``'s ``tls``)
    GENIE_INSECURE=1           allow the token in cleartext to a server that is not on loopback
                               (a trusted network); otherwise that is refused (CleartextTokenError)
    GENIE_RESIDENCY=0          naive mode (above)
    GENIE_PING_AFTER=5         seconds of silence, with requests in flight, before pinging the server
    GENIE_DEAD_AFTER=30        seconds of silence after which the server counts as lost
    GENIE_BUFFER_CACHE=1GiB    bytes of freed receive buffers kept for reuse (in bytes)
    GENIE_EMBEDDED_START_TIMEOUT=120   seconds an embedded server may take to start
"""

from __future__ import annotations

import atexit
import itertools
import os
import random
import threading
import weakref
from collections.abc import Callable, Sequence

import outcome
import torch
import trio

from genie._errors import ConnectionLostError, GenieError, RemoteMemoryError, RemoteProtocolError
from genie.graph import (
    Graph,
    StageSchedule,
)
from genie.runtime._backend import RunResult, Stats
from genie.runtime._bridge import Bridge
from genie.runtime._connection import TLS, Connection, insecure_from_env, tls_context
from genie.runtime._direct import run_direct
from genie.runtime._embedded import EmbeddedServer
from genie.runtime._session import Session, constant_data, parse_weights_index, reads_of
from genie.transport import Message, MissingOnServerError

CONNECT_TIMEOUT = 30.0
RETRIES = 3
HANDLE_SHIFT = 44  # handle >> HANDLE_SHIFT: the server of a ServerSet that holds it (names < 2**53)
_OPEN: weakref.WeakSet[RemoteBackend] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for b in list(_OPEN):
        b.close()


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"genie server address must be host:port, not {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class RemoteBackend:
    """Runs graphs on a ``genie serve`` at ``address`` ("host:port"), or on an embedded one (None)."""

    def __init__(self, address: str | None = None, token: str | None = None, *,
                 residency: bool | None = None, tls: TLS = None, insecure: bool | None = None,
                 index: int = 0, embedded: EmbeddedServer | None = None) -> None:
        self.address = address
        self._host_port = parse_address(address) if address is not None else None
        self.token = token or ""
        self.tls = tls_context(tls)  # the embedded server is on loopback and speaks plain TCP
        # a token goes in cleartext to another machine only when asked (GENIE_INSECURE=1)
        self.insecure = insecure_from_env(os.environ.get("GENIE_INSECURE")) if insecure is None else insecure
        if residency is None:
            residency = os.environ.get("GENIE_RESIDENCY", "1").strip().lower() not in ("0", "false", "no")
        self.residency = residency
        self.stats = Stats()
        self.stats.extra.update(upload_bytes=0, connections=0, streamed_inputs=0, early_outputs=0)
        # ``index``: this server's place in a ServerSet (remote_accelerator:index); its handles carry it
        self.index = index
        self._embedded = (embedded or EmbeddedServer()) if address is None else None
        self._bridge: Bridge | None = None
        self._pid = os.getpid()
        self._session: Session | None = None
        self._connect_lock: trio.Lock | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._frees: list[int] = []  # freed by finalizers, not yet handed to the connection
        self._pins: dict[int, int] = {}  # handle -> submitted runs reading it, not yet posted
        # reentrant: a garbage collection under it can run a finalizer that frees, on this thread
        self._frees_lock = threading.RLock()
        # handles: ours to name; the bits from HANDLE_SHIFT up say which server of a set holds one
        self._names = itertools.count((index << HANDLE_SHIFT) + random.randrange(1, 1 << (HANDLE_SHIFT - 4)))
        # runs reach the server in the order they were made (one may read the handles an earlier
        # one names): a run that must await something first (a connection, an upload) takes a
        # ticket, and every later run posts after it
        self._unposted = 0  # tickets not yet posted; while any, runs cannot post at once
        self._last_ticket: trio.Event | None = None
        self._in_flight: dict[int, trio.Event] = {}  # submitted runs without a reply (``synchronize``)
        _OPEN.add(self)

    # -- the Backend protocol -------------------------------------------------------------------
    def run(self, graph: Graph, inputs: Sequence[torch.Tensor], *, fetch: Sequence[int],
            keep: Sequence[int], constants: dict[str, torch.Tensor], stages: StageSchedule | None = None,
            stream: Sequence[int] = (), trace: bool = False) -> RunResult:
        names = self._new_names(len(keep))
        args = (graph, list(inputs), list(fetch), list(keep), constants, stages, list(stream), trace, names)
        # the caller's thread writes the run and reads its reply itself when the loop is idle
        done = run_direct(self, *args)
        return done if done is not None else self.bridge().call_back(self._start_run, *args)

    async def run_async(self, graph: Graph, inputs: Sequence[torch.Tensor], *, fetch: Sequence[int],
                        keep: Sequence[int], constants: dict[str, torch.Tensor],
                        stages: StageSchedule | None = None, stream: Sequence[int] = (),
                        trace: bool = False) -> RunResult:
        return await self.bridge().call_async(self._run, graph, list(inputs), list(fetch), list(keep),
                                              constants, stages, list(stream), trace,
                                              self._new_names(len(keep)))

    def submit(self, graph: Graph, inputs: Sequence[torch.Tensor], *, keep: Sequence[int],
               constants: dict[str, torch.Tensor], stages: StageSchedule | None = None,
               stream: Sequence[int] = ()) -> list[int]:
        """Start a run that fetches nothing; return its kept values' handles at once, without
        waiting for its reply. Runs reach the server in the order they were made, so the next run
        may read these handles. If it fails, a later run or fetch reading them raises why."""
        names = self._new_names(len(keep))
        # the caller may drop the tensors this run reads before it is posted: their frees wait
        reads = reads_of(graph)
        with self._frees_lock:
            for h in reads:
                self._pins[h] = self._pins.get(h, 0) + 1
        if not self.bridge().soon(self._start_submit, graph, list(inputs), list(keep), constants, stages,
                                  list(stream), names, reads):
            raise ConnectionLostError("genie's background loop has stopped")
        return names

    async def fetch_async(self, handles: Sequence[int]) -> list[torch.Tensor]:
        """CPU copies of kept values, all asked for at once, from any event loop."""
        return await self.bridge().call_async(self._fetch, list(handles))

    def free(self, handle: int) -> None:
        bridge = self._bridge
        if bridge is None or self._closed:
            return
        with self._frees_lock:  # one hop into the loop per batch, not per handle
            first = not self._frees
            self._frees.append(handle)
        if first:
            bridge.later(self._drain_frees)  # frees of dropped values need no place in line

    # -- more -----------------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect now (the first run would otherwise): a bad address or token fails here."""
        self.bridge().call(self._connect)

    def synchronize(self) -> None:
        """Wait until every run submitted so far has its reply, as ``torch.cuda.synchronize`` waits
        for queued kernels. Their failures are not raised here: they surface where their values
        are read."""
        async def drained() -> None:
            for done in list(self._in_flight.values()):
                await done.wait()

        self.bridge().call(drained)

    def weights_index(self, name: str) -> list[tuple[str, torch.dtype, tuple[int, ...], str]]:
        """(tensor name, dtype, shape, content digest) of each tensor of checkpoint ``name`` in the
        server's weights store (``genie serve --weights DIR``); no weight bytes move. WeightsError
        when the server refuses the name."""
        async def ask() -> list[tuple[str, torch.dtype, tuple[int, ...], str]]:
            sess = await self._connect()
            reply = await sess.conn.request(Message("weights", {"name": name}))
            index = parse_weights_index(reply["tensors"])
            sess.known.update(d for *_, d in index)  # held by the server: never uploaded
            return index

        return self.bridge().call(ask)

    def lend(self, handles: list[int]) -> tuple[str, int]:
        """Ask the server to lend kept values to a peer server: (a one-shot transfer token, their
        bytes), once the runs that keep or write them have run."""
        async def ask() -> tuple[str, int]:
            sess, (waiter,) = await self._post_after(handles, [Message("lend", {"handles": handles})])
            reply = await sess.conn.wait(waiter)  # type: ignore[arg-type]
            return reply["token"], reply["nbytes"]

        return self.bridge().call(ask)

    def pull(self, peer: str, token: str, metas: list[tuple[str, list[int]]]) -> list[int]:
        """Have the server pull values a peer lent (``lend``: their dtype names and shapes) straight
        from that peer. Returns at once with the handles it will keep them under: the server runs
        later requests reading them after the pull; if it fails, reading one raises why."""
        names = self._new_names(len(metas))

        async def post() -> None:
            prev, mine = self._ticket()
            try:
                if prev is not None:
                    await prev.wait()
                sess = await self._connect()
                waiter = sess.conn.post(Message("pull", {"peer": peer, "token": token, "names": names,
                                                         "dtypes": [d for d, _ in metas],
                                                         "shapes": [list(s) for _, s in metas]}))
            finally:
                self._posted(mine)
            sess.handles.update(names)
            done = trio.Event()
            self._in_flight[id(done)] = done

            def landed() -> None:  # in the reader, as the reply lands: before any later reply
                try:
                    sess.conn.outcome(waiter)  # type: ignore[arg-type]
                except GenieError as e:
                    sess.handles.difference_update(names)
                    for h in names:
                        sess.failed[h] = e
                finally:
                    self._in_flight.pop(id(done), None)
                    done.set()

            if waiter.event.is_set():  # type: ignore[union-attr]
                landed()
            else:
                waiter.notify = landed  # type: ignore[union-attr]

        self.bridge().call(post)
        return names

    def server_stats(self) -> dict:
        """The server's own counters (constants held, evictions, template hits, ...)."""
        async def ask() -> dict:
            sess = await self._connect()
            return (await sess.conn.request(Message("stats", {})))["stats"]

        return self.bridge().call(ask)

    def close(self) -> None:
        """Close the connection, the background loop and the embedded server (at exit, too)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            bridge, self._bridge = self._bridge, None
        if bridge is not None and bridge.alive and os.getpid() == self._pid:
            bridge.soon(self._drop_session)
            bridge.close()
        if self._embedded is not None and os.getpid() == self._pid:
            self._embedded.close()

    def bridge(self) -> Bridge:
        b = self._bridge
        if b is not None and b.alive and os.getpid() == self._pid:
            return b
        with self._lock:  # many threads may make the first call at once: one loop for all
            if self._closed:
                raise ConnectionLostError("this genie backend was closed")
            b = self._bridge
            if b is None or not b.alive or os.getpid() != self._pid:
                if os.getpid() != self._pid:  # forked: the parent's loop, socket, server are not ours
                    self._pid, self._embedded = os.getpid(), \
                        (EmbeddedServer() if self.address is None else None)
                self._session, self._connect_lock = None, None
                self._unposted, self._last_ticket, self._in_flight = 0, None, {}
                b = self._bridge = Bridge()
            return b

    def _new_names(self, n: int) -> list[int]:
        return [next(self._names) for _ in range(n)]

    def _ticket(self) -> tuple[trio.Event | None, trio.Event]:
        """In the bridge, before any checkpoint: (the previous ticket, ours)."""
        prev, mine = self._last_ticket, trio.Event()
        self._last_ticket = mine
        self._unposted += 1
        return prev, mine

    def _posted(self, ticket: trio.Event) -> None:
        if not ticket.is_set():
            ticket.set()
            self._unposted -= 1

    # -- in the bridge loop ---------------------------------------------------------------------
    def _drop_session(self) -> None:
        if self._session is not None:
            self._session.conn.close()
            self._session = None

    def _drain_frees(self) -> None:
        sess = self._session
        mine = self._take_frees(sess)
        if mine and sess is not None:
            sess.conn.free_later(mine)

    def _take_frees(self, sess: Session | None) -> list[int]:
        """Take the handles finalizers freed (``free``) that no submitted run still reads; those of
        them ``sess`` holds, to send. The queue is swapped out first, so that a finalizer freeing
        during a collection inside (the lock is reentrant) appends to the new one, not lost."""
        with self._frees_lock:
            taken, self._frees = self._frees, []
            if self._pins:
                self._frees.extend(h for h in taken if h in self._pins)
                taken = [h for h in taken if h not in self._pins]
        if sess is None:
            return []
        for h in taken:
            sess.failed.pop(h, None)
        mine = [h for h in taken if h in sess.handles]
        sess.handles.difference_update(mine)
        return mine

    def _start_run(self, reply: Callable[[outcome.Outcome], None], graph: Graph, inputs: list[torch.Tensor],
                   fetch: list[int], keep: list[int], constants: dict[str, torch.Tensor],
                   stages: StageSchedule | None, stream: list[int], trace: bool,
                   names: list[int]) -> Callable[[], None]:
        """In the bridge loop, for a blocked caller (``Bridge.call_back``) or a submit: when nothing
        must be awaited first (connected, every big constant already on the server, no earlier run
        still waiting to be posted), post the run at once, and let the connection's reader build
        the result and hand it to ``reply`` as it lands. Otherwise (or when the server lost a
        constant meanwhile) ``_run`` does it all as a task. Returns what stops the run."""
        args = (graph, inputs, fetch, keep, constants, stages, stream, trace, names)
        sess = self._session
        data = constant_data(graph, constants)
        if not self._can_post_now(sess, data, stages):
            return self._run_task(reply, (*args, self._ticket()))
        assert sess is not None
        self._drain_frees()  # they ride on this run
        sess.check_residents(graph)
        waiter = sess.post_run(graph, inputs, fetch, keep, data, None, stream, trace, names)
        stopped = False

        def landed() -> None:  # in the reader, as the reply (or the connection's loss) lands
            if stopped:
                return
            try:
                reply(outcome.Value(sess.result(graph, waiter, len(fetch), names)))
            except MissingOnServerError as e:  # evicted under the memory limit meanwhile: retry
                sess.known.difference_update(e.digests)
                stop_retry.append(self._run_task(reply, args))
            except Exception as e:
                reply(outcome.Error(e))

        stop_retry: list[Callable[[], None]] = []

        def stop() -> None:
            nonlocal stopped
            stopped = True
            sess.conn.abandon(waiter)
            for s in stop_retry:
                s()

        if waiter.event.is_set():  # refused before it was written (LocalProtocolError)
            landed()
        else:
            waiter.notify = landed
        return stop

    def _can_post_now(self, sess: Session | None, data: dict[str, torch.Tensor],
                      stages: StageSchedule | None) -> bool:
        return not (sess is None or sess.conn.closed or stages is not None or self._unposted
                    or sess.lacks_big_constants(data))

    def _start_submit(self, graph: Graph, inputs: list[torch.Tensor], keep: list[int],
                      constants: dict[str, torch.Tensor], stages: StageSchedule | None, stream: list[int],
                      names: list[int], reads: list[int]) -> None:
        """``submit`` in the bridge loop: ``_start_run``, with nobody waiting; its outcome only
        marks the handles (and lets go of the handles it reads)."""
        done = trio.Event()
        self._in_flight[id(done)] = done

        def settle(result: outcome.Outcome) -> None:
            self._in_flight.pop(id(done), None)
            done.set()
            self._unpin(reads)
            self._settle_submit(names, result)

        try:
            self._start_run(settle, graph, inputs, [], keep, constants, stages, stream, False, names)
        except Exception as e:  # never raise out of a callback of the loop
            settle(outcome.Error(e))

    def _unpin(self, reads: list[int]) -> None:
        if not reads:
            return
        with self._frees_lock:
            for h in reads:
                left = self._pins.pop(h) - 1
                if left:
                    self._pins[h] = left
            waiting = bool(self._frees)
        if waiting:
            self._drain_frees()

    def _settle_submit(self, names: list[int], result: outcome.Outcome) -> None:
        """A submitted run's outcome: on failure its handles hold nothing, and say why."""
        if isinstance(result, outcome.Value):
            return
        sess = self._session
        if sess is not None:
            sess.handles.difference_update(names)
            for h in names:
                sess.failed[h] = result.error

    async def _post_after(self, handles: list[int], messages: list[Message]) -> tuple[Session, list]:
        """Post ``messages`` (about kept values ``handles``) in this backend's order: after the runs
        that make those values, once each is known to be still held. (The session, the waiters.)"""
        prev, mine = self._ticket()
        try:
            if prev is not None:
                await prev.wait()
            sess = await self._connect()
            for h in handles:
                sess.check_handle(h)
            return sess, [sess.conn.post(m) for m in messages]
        finally:
            self._posted(mine)

    async def _fetch(self, handles: list[int]) -> list[torch.Tensor]:
        sess, waiters = await self._post_after(handles, [Message("fetch", {"handle": h}) for h in handles])
        out = []
        try:
            for h, w in zip(handles, waiters, strict=True):
                try:
                    reply = await sess.conn.wait(w)  # type: ignore[arg-type]
                except GenieError as e:  # its run failed after we asked: say why it failed
                    sess.raise_cause([h], e)
                    raise
                if len(reply.buffers) != 1 or not isinstance(reply.buffers[0], torch.Tensor):
                    raise RemoteProtocolError("a fetch result must carry one tensor")
                out.append(reply.buffers[0])
        finally:
            for w in waiters[len(out):]:
                sess.conn.abandon(w)  # type: ignore[arg-type]
        return out

    def _run_task(self, reply: Callable[[outcome.Outcome], None], args: tuple) -> Callable[[], None]:
        """``_run(*args)`` as a task of the bridge; its outcome to ``reply``; returns its cancel."""
        scope = trio.CancelScope()

        async def runner() -> None:
            result: outcome.Outcome = outcome.Error(ConnectionLostError("genie's background loop was "
                                                                        "shut down"))
            with scope:
                try:
                    result = outcome.Value(await self._run(*args))
                except Exception as e:
                    result = outcome.Error(e)
            reply(result)

        self.bridge_nursery().start_soon(runner)
        return scope.cancel

    async def _connect(self) -> Session:
        sess = self._session
        if sess is not None and not sess.conn.closed:
            return sess
        if self._connect_lock is None:
            self._connect_lock = trio.Lock()
        async with self._connect_lock:
            sess = self._session
            if sess is not None and not sess.conn.closed:
                return sess
            if self._embedded is not None:
                host, port, token = await trio.to_thread.run_sync(self._embedded.ensure)
                tls = None
            else:
                (host, port), token, tls = self._host_port, self.token, self.tls  # type: ignore[misc]
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    conn = await Connection.open(host, port, token, self.stats, tls, insecure=self.insecure)
            except trio.TooSlowError:
                raise ConnectionLostError(f"timed out connecting to the genie server at {host}:{port}") \
                    from None
            await self.bridge_nursery().start(conn.run)
            self.stats.extra["connections"] += 1
            self._session = sess = Session(conn, self.stats, self.residency)
            conn.holds_values = lambda: bool(sess.handles)
            return self._session

    def bridge_nursery(self) -> trio.Nursery:
        nursery = self._bridge._nursery if self._bridge is not None else None
        if nursery is None:
            raise ConnectionLostError("genie's background loop has stopped")
        return nursery

    async def _run(self, graph: Graph, inputs: list[torch.Tensor], fetch: list[int], keep: list[int],
                   constants: dict[str, torch.Tensor], stages: StageSchedule | None = None,
                      stream: list[int] | None = None, trace: bool = False,
                   names: list[int] | None = None,
                   ticket: tuple[trio.Event | None, trio.Event] | None = None) -> RunResult:
        names = self._new_names(len(keep)) if names is None else names
        prev, mine = self._ticket() if ticket is None else ticket
        try:
            if prev is not None:
                await prev.wait()
            sess = await self._connect()
            data = constant_data(graph, constants)
            sess.check_residents(graph)
            await sess.ensure_constants(data)
        except BaseException:
            self._posted(mine)
            raise
        for attempt in range(RETRIES):
            if attempt:  # a retry after an eviction: later runs may have gone ahead (rare)
                sess.check_residents(graph)
                await sess.ensure_constants(data)
            try:
                waiter = sess.post_run(graph, inputs, fetch, keep, data, stages, stream or [], trace, names)
            finally:
                self._posted(mine)
            try:
                reply = await sess.conn.wait(waiter)
            except MissingOnServerError as e:  # evicted under the server's memory limit meanwhile
                sess.known.difference_update(e.digests)
                sess.schedules.discard(e.schedule or "")
                continue
            except GenieError as e:
                sess.run_failed(graph, waiter, names, e)
                raise
            break
        else:
            raise RemoteMemoryError("the server keeps evicting this program's constants before it "
                                    "runs: its --memory-limit is too small for the working set")
        return sess.result(graph, waiter, len(fetch), names, reply)


def backend_from_env() -> RemoteBackend:
    """``GENIE_SERVER``'s backend: one server, or a ServerSet (``genie.runtime._servers``)."""
    from genie.runtime._servers import backend_from_env as from_env

    return from_env()  # type: ignore[return-value]
