"""ServerSet: many ``genie serve``s, one device each: ``remote_accelerator:i`` is server i.

Each server keeps its own weights, plans, residents and connection (a RemoteBackend each). A kept
value's handle says which server holds it (``HANDLE_SHIFT``). A graph whose nodes all run on one
server goes to that server as it is; a graph that spans servers (a pipeline whose stage k+1 reads
``h.to("remote_accelerator:j")``) is cut into one-server pieces (``_placement``) run in program
order. A value a piece on server j reads from server i moves between the two servers directly
(``lend`` on i, ``pull`` on j: ``genie.server._peers``); its bytes never pass through this process.

Call tree::

    ServerSet.run(graph, inputs, fetch=, keep=, constants=)
      placement(graph)               the server of each node
      one server -> backends[i].run(...)                           the common case: as before
      several    -> _run_split:
        cut(graph)                   pieces; what each hands to later pieces
        for each piece, in order:
          _bring(...)                the values it reads from other servers, one _move per server:
                                     lend (waits for the runs making them) + pull (posted, not
                                     waited for: the piece's run waits for it on the server)
          _piece_graph(...)          its nodes, with what it reads from elsewhere as RESIDENT nodes
          _run_piece(...)            submitted (fetches nothing) or run (fetches final outputs);
                                     keeps what later pieces read and the caller keeps
        fetch final outputs kept on a server that ran again later; free the hand-off handles

Failure: a call that loses a server raises ConnectionLostError naming the device and its address;
the other servers' connections and values are untouched, and the next call reconnects.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import trio

from genie._errors import ConnectionLostError
from genie.graph import CONST, INPUT, RESIDENT, Graph, Node, Ref, StageSchedule, TensorMeta, map_refs
from genie.runtime import _backend
from genie.runtime._backend import RunResult, Stats
from genie.runtime._connection import TLS, tls_from_env
from genie.runtime._embedded import embedded_set
from genie.runtime._placement import Piece, cut, placement, servers_used
from genie.runtime._remote import HANDLE_SHIFT, RemoteBackend
from genie.transport import DTYPES

T = TypeVar("T")
_DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}


class _SumStats(Stats):
    """The servers' counters added up (``genie.stats()``), read when asked."""

    def __init__(self, backends: Sequence[RemoteBackend]) -> None:
        super().__init__()
        self._backends = backends

    def as_dict(self) -> dict:
        total: dict = {}
        for b in self._backends:
            for k, v in b.stats.as_dict().items():
                if isinstance(v, (int, float)):
                    total[k] = total.get(k, 0) + v
        total.update(self.extra)
        return total


class ServerSet:
    """``remote_accelerator:i`` is ``backends[i]`` (``genie.connect([...])``)."""

    def __init__(self, backends: Sequence[RemoteBackend]) -> None:
        if not backends:
            raise ValueError("a ServerSet needs at least one server")
        for i, b in enumerate(backends):
            if b.index != i:
                raise ValueError(f"server {i} was made with index={b.index}: its handles would not say "
                                 "where they live")
        self.backends = list(backends)
        self.stats = _SumStats(self.backends)
        self.stats.extra.update(transfers=0, transfer_bytes=0, split_runs=0)

    @classmethod
    def embedded(cls, n: int, *, residency: bool | None = None) -> ServerSet:
        """``n`` embedded servers on loopback, each allowed to pull from the others: several
        devices in one process's children, for tests and demos (``genie.connect(embedded=n)``)."""
        return cls([RemoteBackend(None, index=i, embedded=s, residency=residency)
                    for i, s in enumerate(embedded_set(n))])

    # -- which server ------------------------------------------------------------------------------
    @property
    def addresses(self) -> list[str]:
        return [b.address or (b._embedded.address if b._embedded else "?") for b in self.backends]

    def device_count(self) -> int:
        return len(self.backends)

    def label(self, i: int) -> str:
        return f"remote_accelerator:{i} (genie server at {self.addresses[i]})"

    def server(self, index: int) -> RemoteBackend:
        """The backend of device ``index``; IndexError naming the servers past the last one."""
        if not 0 <= index < len(self.backends):
            raise IndexError(f"invalid device index {index}: remote_accelerator has {len(self.backends)} "
                             f"device(s), one per connected genie server: "
                             + ", ".join(f"{i}: {a}" for i, a in enumerate(self.addresses)))
        return self.backends[index]

    def _of_handle(self, handle: int) -> int:
        return handle >> HANDLE_SHIFT

    def _on(self, i: int, call: Callable[[RemoteBackend], T]) -> T:
        """``call(server i)``; a lost connection is named by its device and address."""
        b = self.server(i)
        try:
            return call(b)
        except ConnectionLostError as e:
            raise ConnectionLostError(f"{self.label(i)}: {e}") from e

    # -- the Backend protocol -----------------------------------------------------------------------
    def run(self, graph: Graph, inputs: Sequence[torch.Tensor], *, fetch: Sequence[int],
            keep: Sequence[int], constants: dict[str, torch.Tensor], stages: StageSchedule | None = None,
            stream: Sequence[int] = (), trace: bool = False) -> RunResult:
        place = placement(graph, HANDLE_SHIFT)
        used = servers_used(graph, place)
        if len(used) <= 1:
            i = used.pop() if used else 0
            return self._on(i, lambda b: b.run(graph, inputs, fetch=fetch, keep=keep, constants=constants,
                                               stages=stages, stream=stream, trace=trace))
        return self._run_split(graph, list(inputs), list(fetch), list(keep), constants, place)

    async def run_async(self, graph: Graph, inputs: Sequence[torch.Tensor], *, fetch: Sequence[int],
                        keep: Sequence[int], constants: dict[str, torch.Tensor],
                        stages: StageSchedule | None = None, stream: Sequence[int] = (),
                        trace: bool = False) -> RunResult:
        place = placement(graph, HANDLE_SHIFT)
        used = servers_used(graph, place)
        i = min(used) if used else 0
        b = self.server(i)
        if len(used) <= 1:
            try:
                return await b.run_async(graph, inputs, fetch=fetch, keep=keep, constants=constants,
                                         stages=stages, stream=stream, trace=trace)
            except ConnectionLostError as e:
                raise ConnectionLostError(f"{self.label(i)}: {e}") from e
        split = functools.partial(self._run_split, graph, list(inputs), list(fetch), list(keep), constants,
                                  place)
        return await b.bridge().call_async(trio.to_thread.run_sync, split)

    def submit(self, graph: Graph, inputs: Sequence[torch.Tensor], *, keep: Sequence[int],
               constants: dict[str, torch.Tensor], stages: StageSchedule | None = None,
               stream: Sequence[int] = ()) -> list[int]:
        place = placement(graph, HANDLE_SHIFT)
        used = servers_used(graph, place)
        if len(used) <= 1:
            i = used.pop() if used else 0
            return self._on(i, lambda b: b.submit(graph, inputs, keep=keep, constants=constants,
                                                  stages=stages, stream=stream))
        return self._run_split(graph, list(inputs), [], list(keep), constants, place).handles

    async def fetch_async(self, handles: Sequence[int]) -> list[torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        by_server: dict[int, list[int]] = {}
        for h in handles:
            by_server.setdefault(self._of_handle(h), []).append(h)
        for i, hs in by_server.items():
            try:
                values = await self.server(i).fetch_async(hs)
            except ConnectionLostError as e:
                raise ConnectionLostError(f"{self.label(i)}: {e}") from e
            out.update(zip(hs, values, strict=True))
        return [out[h] for h in handles]

    def free(self, handle: int) -> None:
        i = self._of_handle(handle)
        if 0 <= i < len(self.backends):
            self.backends[i].free(handle)

    # -- more --------------------------------------------------------------------------------------
    def connect(self) -> None:
        for i in range(len(self.backends)):
            self._on(i, RemoteBackend.connect)

    def synchronize(self) -> None:
        for i in range(len(self.backends)):
            self._on(i, RemoteBackend.synchronize)

    def server_stats(self, index: int = 0) -> dict:
        return self._on(index, RemoteBackend.server_stats)

    def weights_index(self, name: str) -> list:
        return self._on(0, lambda b: b.weights_index(name))

    def close(self) -> None:
        for b in self.backends:
            b.close()

    # -- a graph across servers ---------------------------------------------------------------------
    def _run_split(self, graph: Graph, inputs: list[torch.Tensor], fetch: list[int], keep: list[int],
                   constants: dict[str, torch.Tensor], place: list[int]) -> RunResult:
        pieces, piece_of = cut(graph, place)
        self.stats.extra["split_runs"] += 1
        last_on = {p.server: k for k, p in enumerate(pieces)}
        direct: dict[int, list[Ref]] = {}  # piece -> final outputs it fetches itself
        finals: dict[int, list[int]] = {}  # piece -> the entries of ``keep`` it keeps (a handle each)
        tails: dict[int, Piece] = {}  # server -> a piece of no ops for outputs that are sources
        for pos in dict.fromkeys([*fetch, *keep]):
            r = graph.outputs[pos]
            k = piece_of.get(r.node)
            if k is None:  # the output is a source node itself: a piece of its own hands it back
                node = graph.nodes[r.node]
                s = self._of_handle(node.args[0]) if node.op == RESIDENT else 0
                tails.setdefault(s, Piece(s))
                k = len(pieces) + list(tails).index(s)
            owner = pieces[k] if k < len(pieces) else tails[list(tails)[k - len(pieces)]]
            if pos in fetch and pos not in keep and k == last_on.get(owner.server):
                direct.setdefault(k, []).append(r)
            elif pos in fetch and r not in owner.hands:  # kept, and fetched once the rest has run
                owner.hands.append(r)
        for i, pos in enumerate(keep):  # each entry its own handle, as one server names them
            r = graph.outputs[pos]
            k = piece_of.get(r.node)
            if k is None:
                node = graph.nodes[r.node]
                s = self._of_handle(node.args[0]) if node.op == RESIDENT else 0
                k = len(pieces) + list(tails).index(s)
            finals.setdefault(k, []).append(i)
        pieces.extend(tails.values())
        kept: dict[Ref, tuple[int, int, TensorMeta]] = {}  # handed value -> (server, handle, meta)
        final: dict[int, tuple[int, TensorMeta]] = {}  # entry of ``keep`` -> (handle, meta)
        fetched: dict[Ref, torch.Tensor] = {}
        temporary: list[tuple[int, int]] = []  # (server, handle) to free at the end
        try:
            for k, piece in enumerate(pieces):
                brought = self._bring(graph, piece, piece_of, k, kept, temporary)
                mine = finals.get(k, [])
                outs = [*direct.get(k, []), *piece.hands, *[graph.outputs[keep[i]] for i in mine]]
                sub, sub_inputs, digests = _piece_graph(graph, piece, inputs, brought, outs)
                result = self._run_piece(piece.server, sub, sub_inputs, len(direct.get(k, [])),
                                         {d: constants[d] for d in digests})
                fetched.update(zip(direct.get(k, []), result.fetched, strict=True))
                kept_here = list(zip(result.handles, result.metas, strict=True))
                for r, (h, m) in zip(piece.hands, kept_here, strict=False):
                    kept[r] = (piece.server, h, m)
                    temporary.append((piece.server, h))
                final.update(zip(mine, kept_here[len(piece.hands):], strict=True))
            late = [graph.outputs[p] for p in fetch if graph.outputs[p] not in fetched]
            for r in dict.fromkeys(late):
                s, h, _ = kept[r]
                (value,) = self._on(s, lambda b, h=h: b.bridge().call(b._fetch, [h]))
                fetched[r] = value
        finally:
            for s, h in temporary:
                self.backends[s].free(h)
        return RunResult([fetched[graph.outputs[p]] for p in fetch], [final[i][0] for i in range(len(keep))],
                         [final[i][1] for i in range(len(keep))])

    def _run_piece(self, server: int, sub: Graph, inputs: list[torch.Tensor], n_fetch: int,
                   constants: dict[str, torch.Tensor]) -> RunResult:
        """A piece that fetches nothing is submitted: the next request (a lend of what it keeps)
        goes out at once, and the server runs it after this one."""
        keep = range(n_fetch, len(sub.outputs))
        if n_fetch or any(not sub.nodes[r.node].outputs for r in sub.outputs):
            return self._on(server, lambda b: b.run(sub, inputs, fetch=range(n_fetch), keep=keep,
                                                    constants=constants))
        handles = self._on(server, lambda b: b.submit(sub, inputs, keep=keep, constants=constants))
        return RunResult([], handles, [sub.meta(r) for r in sub.outputs])

    def _bring(self, graph: Graph, piece: Piece, piece_of: dict[int, int], k: int,
               kept: dict[Ref, tuple[int, int, TensorMeta]],
               temporary: list[tuple[int, int]]) -> dict[Ref, tuple[int, TensorMeta]]:
        """Each value ``piece`` reads from elsewhere, as (a handle on its server, meta): kept by an
        earlier piece, or a resident; moved from another server when it lives there, all of one
        server's at once."""
        brought: dict[Ref, tuple[int, TensorMeta]] = {}
        moves: dict[int, dict[Ref, tuple[int, TensorMeta]]] = {}  # source server -> what comes from it
        reads = [r for nid in piece.nodes for r in graph.nodes[nid].refs()] + list(piece.hands)
        for r in reads:
            if r in brought or piece_of.get(r.node) == k:
                continue
            node = graph.nodes[r.node]
            if r in kept:
                s, h, meta = kept[r]
            elif node.op == RESIDENT:
                s, h, meta = self._of_handle(node.args[0]), node.args[0], node.outputs[r.index]
            else:
                continue  # CONST, INPUT: sent with the piece
            if s == piece.server:
                brought[r] = (h, meta)
            else:
                moves.setdefault(s, {})[r] = (h, meta)
        for s, values in moves.items():
            names = self._move(s, [h for h, _ in values.values()], [m for _, m in values.values()],
                               piece.server)
            for (r, (_, meta)), name in zip(values.items(), names, strict=True):
                brought[r] = (name, _dense(meta))
                temporary.append((piece.server, name))
        return brought

    def _move(self, src: int, handles: list[int], metas: list[TensorMeta], dst: int) -> list[int]:
        """Server ``src`` lends ``handles``; server ``dst`` pulls them straight from ``src``."""
        token, nbytes = self._on(src, lambda b: b.lend(handles))
        peer = self.addresses[src]
        described = [(_DTYPE_NAMES[m.dtype], list(m.shape)) for m in metas]
        names = self._on(dst, lambda b: b.pull(peer, token, described))
        self.stats.extra["transfers"] += len(handles)
        self.stats.extra["transfer_bytes"] += nbytes
        return names


def _dense(meta: TensorMeta) -> TensorMeta:
    """A moved value arrives contiguous."""
    stride, n = [], 1
    for s in reversed(meta.shape):
        stride.append(n)
        n *= max(s, 1)
    return TensorMeta(meta.shape, tuple(reversed(stride)), meta.dtype, 0)


def _piece_graph(graph: Graph, piece: Piece, inputs: list[torch.Tensor],
                 brought: dict[Ref, tuple[int, TensorMeta]], outs: list[Ref]
                 ) -> tuple[Graph, list[torch.Tensor], list[str]]:
    """``piece``'s ops as a graph of their own: sources it reads are copied in, values from other
    pieces are RESIDENT nodes of their handles; ``outs`` are its outputs. Storages are renumbered
    densely by first use, as the recorder names them."""
    nodes: list[Node] = []
    new_id: dict[object, int] = {}  # old node id (or the brought Ref) -> new node id
    storages: dict[int, int] = {}
    sub_inputs: list[torch.Tensor] = []
    digests: list[str] = []
    sid = lambda s: storages.setdefault(s, len(storages))  # noqa: E731
    mine = set(piece.nodes)

    def add(node: Node) -> int:
        nodes.append(node.replace(id=len(nodes)))
        return len(nodes) - 1

    def ref(r: Ref) -> Ref:
        if r.node in mine:
            return Ref(new_id[r.node], r.index)
        if r in brought:
            if r not in new_id:
                h, meta = brought[r]
                storage = graph.nodes[r.node].storages[r.index]
                new_id[r] = add(Node(0, RESIDENT, (h,), outputs=(meta,), storages=(sid(storage),)))
            return Ref(new_id[r], 0)
        if r.node not in new_id:  # a CONST or INPUT: sent with this piece
            n = graph.nodes[r.node]
            args = n.args
            if n.op == INPUT:
                args = (len(sub_inputs),)
                sub_inputs.append(inputs[n.args[0]])
            elif n.op == CONST:
                digests.append(n.args[0])
            else:
                raise AssertionError(f"{n.op} node %{n.id} read across servers was not brought")
            new_id[r.node] = add(n.replace(args=args, storages=tuple(sid(s) for s in n.storages),
                                           writes=()))
        return Ref(new_id[r.node], r.index)

    for nid in piece.nodes:
        n = graph.nodes[nid]
        args = map_refs(n.args, ref)
        kwargs = {k: map_refs(v, ref) for k, v in n.kwargs.items()} if n.kwargs else n.kwargs
        new_id[nid] = add(n.replace(args=args, kwargs=kwargs, storages=tuple(sid(s) for s in n.storages),
                                    writes=tuple(sid(s) for s in n.writes)))
    outputs = [ref(r) for r in outs]
    return Graph(nodes, outputs), sub_inputs, list(dict.fromkeys(digests))


# -- choosing the backend -----------------------------------------------------------------------
def backend_from_env() -> RemoteBackend | ServerSet:
    """``GENIE_SERVER=host:port`` (+ ``GENIE_TOKEN``, ``GENIE_TLS``): that server; ``h:p,h:p``: one
    device per server; ``embedded:N``: N embedded servers; unset: one embedded server."""
    address = os.environ.get("GENIE_SERVER", "").strip() or None
    if address is not None and address.startswith("embedded:"):
        return ServerSet.embedded(int(address.removeprefix("embedded:")))
    tls = tls_from_env(os.environ.get("GENIE_TLS")) if address is not None else None
    if address is not None and "," in address:
        return _backends([a for a in address.split(",") if a.strip()], os.environ.get("GENIE_TOKEN"),
                         tls=tls)
    return RemoteBackend(address, os.environ.get("GENIE_TOKEN"), tls=tls)


def _backends(addresses: Sequence[str], token: str | None, **kw) -> ServerSet:
    return ServerSet([RemoteBackend(a, token, index=i, **kw) for i, a in enumerate(addresses)])


def connect(address: str | Sequence[str] | None = None, token: str | None = None, *,
            residency: bool | None = None, tls: TLS = None, insecure: bool | None = None,
            embedded: int | None = None) -> RemoteBackend | ServerSet:
    """Point this process at the genie server at ``address`` ("host:port"; None: an embedded one).

    A list of addresses makes ``remote_accelerator:i`` server i (one device each, a ServerSet;
    ``torch.remote_accelerator.device_count()`` is their number), all with the same ``token``
    (a pool's). ``embedded=n`` starts n embedded servers on loopback instead, each allowed to pull
    values from the others: several devices for tests and demos, no GPU needed.

    Connects at once, so a wrong address, token or certificate raises here. Tensors kept on the
    previous server are lost. ``token`` defaults to ``$GENIE_TOKEN``; ``residency=False`` is the
    naive mode.

    ``tls`` (default ``$GENIE_TLS``) encrypts the connection, for a server started with
    ``--tls-cert``/``--tls-key``: True verifies its certificate against the system's CAs, a path
    against that CA bundle (PEM), and an ``ssl.SSLContext`` is used as it is. The certificate must
    name the host in ``address``. The embedded server (``address`` None) is plain loopback.

    A token never goes in cleartext to another machine: with a token, no ``tls`` and an address
    that is not loopback, this raises CleartextTokenError, unless ``insecure=True`` (default
    ``$GENIE_INSECURE``) says the network is trusted.
    """
    if tls is None and address is not None:
        tls = tls_from_env(os.environ.get("GENIE_TLS"))
    token = token if token is not None else os.environ.get("GENIE_TOKEN")
    b: RemoteBackend | ServerSet
    if embedded is not None:
        if address is not None:
            raise ValueError("genie.connect: give addresses or embedded=n, not both")
        b = ServerSet.embedded(embedded, residency=residency)
    elif isinstance(address, (list, tuple)):
        b = _backends(address, token, residency=residency, tls=tls, insecure=insecure)
    else:
        b = RemoteBackend(address, token, residency=residency, tls=tls, insecure=insecure)  # type: ignore[arg-type]
    try:
        b.connect()
    except BaseException:
        b.close()
        raise
    old = _backend._backend
    _backend.set_backend(b)
    if isinstance(old, (RemoteBackend, ServerSet)):
        old.close()
    return b
