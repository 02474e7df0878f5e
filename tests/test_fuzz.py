"""A fuzzer against a real ``genie serve``: mutated frames of a real client, and valid frames that
call vetted ops with hostile argument values.

Frames: seeds are the frames a real client sent (recorded by a loopback proxy) while it uploaded
weights, ran traced and device-mode programs, streamed inputs, fetched, freed and asked for stats.
Each fuzz case replays one recorded conversation on a fresh authenticated connection, with some
frames mutated: a JSON header field replaced by a hostile value, bytes flipped, lengths changed,
frames cut short or dropped.

Ops: seeds are real calls of vetted ops (``genie.graph.VETTED``), recorded in eager from small
programs (embeddings and bags, gathers and scatters, index ops, segment sums, CTC and NLL losses,
bincounts, convolutions, pools, views, factories, random ops...). Each fuzz case sends one as a
well-formed one-node graph, with one argument made hostile: indices, offsets and lengths out of
range, sizes negative or huge, odd dtypes, NaNs, flipped flags, a tensor dropped, the declared
output changed.

Throughout, an honest client keeps one connection open. Both tests assert that the server never
dies, that the honest client's connection is never closed, and that it still gets correct answers.
``GENIE_FUZZ_SECONDS`` sets the budget of the two together (default 40 s, half each);
``GENIE_FUZZ_SEED`` the seed. Counts are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

import _server_fixtures as fx
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import genie
from genie.graph import INPUT, VETTED, Graph, Node, Ref, TensorMeta, op_name
from genie.runtime._remote import RemoteBackend
from genie.transport._protocol import MAGIC, PREFIX

SECONDS = float(os.environ.get("GENIE_FUZZ_SECONDS", "40")) / 2  # each of the two tests
SEED = int(os.environ.get("GENIE_FUZZ_SEED", "0"))
_WORKER_DIED = re.compile(r"worker \(pid \d+\) (killed|exited)")  # a tenant's worker, as the front logs it
HONEST_EVERY = int(os.environ.get("GENIE_FUZZ_HONEST_EVERY", "25"))  # fuzz cases per honest run
LOG = open(os.environ["GENIE_FUZZ_LOG"], "w") if os.environ.get("GENIE_FUZZ_LOG") else None  # noqa: SIM115

# Values an attacker would put in a field: wrong types, extremes, names that reach Python internals.
HOSTILE = [
    None, True, -1, 0, 1, 2**31, 2**63 - 1, -(2**63), 1e308, "", "x" * 300, [], {}, [[]], [-1],
    [2**62], [0, 0, 0], {"a": 1}, "aten.__init__.__getattribute__", "aten.from_file.default",
    "prims.__class__.__call__", "genie.nope", "quint8", "qint8", "qint32", "float32", "graph", "slot",
    ["quint8", [4]], ["float32", [2**40]], ["bytes", -5], ["bytes", 2**40], ["float32", [-1]],
    {"r": [0, 0]}, {"dt": "qint8"}, {"dev": "cuda:7"}, {"d": {"x": {"r": [99, 0]}}},
]


class Recorder:
    """A loopback proxy that keeps every byte the client sends, split into frames later."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sessions: list[bytearray] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            sent = bytearray()
            self.sessions.append(sent)
            threading.Thread(target=self._pump, args=(client, upstream, sent), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, log: bytearray | None) -> None:
        try:
            while data := src.recv(1 << 16):
                if log is not None:
                    log += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def split_frames(data: bytes) -> list[bytes]:
    frames, pos = [], 0
    while pos + PREFIX.size <= len(data):
        _, _, _, hlen, plen = PREFIX.unpack_from(data, pos)
        end = pos + PREFIX.size + hlen + plen
        frames.append(bytes(data[pos:end]))
        pos = end
    return frames


def honest_program(b: RemoteBackend) -> None:
    """One traced run with a fetch and a keep; raises if the answer is wrong."""
    w = torch.randn(8, 8)
    graph = genie.trace(lambda x: (torch.relu(x @ w) + 1, x * 2), torch.randn(2, 8))
    x = torch.randn(2, 8)
    out = b.run(graph, [x], fetch=[0], keep=[1], constants=graph.constants)
    torch.testing.assert_close(out.fetched[0], torch.relu(x @ w) + 1)
    assert len(out.handles) == 1
    b.free(out.handles[0])


def record_seeds(server: fx.ServerProcess) -> list[list[bytes]]:
    """The frames of a few real client conversations, each starting with its hello."""
    proxy = Recorder(server.port)
    try:
        with fx.using(RemoteBackend(f"127.0.0.1:{proxy.port}", server.token)) as b:
            honest_program(b)
            honest_program(b)  # the second one runs from a template slot
            dev = "remote_accelerator:0"
            lin = torch.nn.Linear(16, 16).to(dev)
            x = torch.randn(4, 16, device=dev)
            y = torch.softmax(lin(x), -1).sum(0)
            y.cpu()
            (y * 3).tolist()
            big = torch.randn(64, 512)  # a streamed input (>= 64 KiB) through a staged plan
            graph = genie.trace(lambda a, c: (a @ c.T).relu(), torch.randn(8, 512), big)
            plan = genie.schedule(graph, genie.analyze(graph))
            b.run(plan.graph, [torch.randn(8, 512), big], fetch=[0], keep=[],
                  constants=plan.graph.constants, stages=plan.stage_schedule(), stream=[1])
            b.server_stats()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not proxy.sessions:
            time.sleep(0.05)
        time.sleep(0.2)  # the last frames (frees) are flushed when the backend closes
    finally:
        proxy.close()
    return [split_frames(bytes(s)) for s in proxy.sessions if s]


# -- mutations ----------------------------------------------------------------------------------------
def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))
    yield path


def _set(obj, path, value):
    if not path:
        return value
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return obj


def _reframe(frame: bytes, header: dict | None = None, payload: bytes | None = None,
             plen: int | None = None) -> bytes:
    magic, version, code, hlen, old_plen = PREFIX.unpack_from(frame)
    head = frame[PREFIX.size : PREFIX.size + hlen] if header is None else json.dumps(header).encode()
    body = frame[PREFIX.size + hlen :] if payload is None else payload
    return PREFIX.pack(magic, version, code, len(head), len(body) if plen is None else plen) + head + body


def mutate(frame: bytes, rng: random.Random) -> bytes:
    _, _, _, hlen, _ = PREFIX.unpack_from(frame)
    how = rng.randrange(8)
    if how <= 2:  # a hostile value in one JSON field (the most productive mutation)
        header = json.loads(frame[PREFIX.size : PREFIX.size + hlen])
        path = rng.choice(list(_leaves(header)))
        return _reframe(frame, header=_set(header, path, rng.choice(HOSTILE)))
    if how == 3:  # a field dropped, or an unknown one added
        header = json.loads(frame[PREFIX.size : PREFIX.size + hlen])
        if header and rng.random() < 0.5:
            header.pop(rng.choice(list(header)))
        else:
            name = rng.choice(["stages", "stream", "slot", "check", "frees", "trace", "zz"])
            header[name] = rng.choice(HOSTILE)
        return _reframe(frame, header=header)
    if how == 4:  # flipped bytes anywhere
        b = bytearray(frame)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
        return bytes(b)
    if how == 5:  # a payload length that lies
        _, _, _, _, plen = PREFIX.unpack_from(frame)
        return _reframe(frame, plen=rng.choice([0, plen + 1, max(0, plen - 1), plen * 2 + 64, 2**33]))
    if how == 6:  # a message kind changed
        b = bytearray(frame)
        b[3] = rng.randrange(0, 20)
        return bytes(b)
    return frame[: rng.randrange(len(frame))]  # cut short


def describe(frame: bytes) -> str:
    if len(frame) < PREFIX.size:
        return f"cut prefix {frame!r}"
    magic, version, code, hlen, plen = PREFIX.unpack_from(frame)
    head = frame[PREFIX.size : PREFIX.size + min(hlen, 400)]
    return f"{magic!r} v{version} code {code} hlen {hlen} plen {plen} sent {len(frame)}: {head!r}"


def fuzz_case(port: int, frames: list[bytes], rng: random.Random) -> list[bytes]:
    """Replay one conversation with mutations; the frames sent."""
    hello, rest = frames[0], list(frames[1:])
    if rest and rng.random() < 0.3:
        rest = rng.sample(rest, rng.randint(1, len(rest)))  # dropped and reordered frames
    out = [mutate(f, rng) if rng.random() < 0.12 else f for f in rest]
    if out == rest and out:
        i = rng.randrange(len(out))
        out[i] = mutate(out[i], rng)
    if rng.random() < 0.05:
        hello = mutate(hello, rng)
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    sent: list[bytes] = []
    try:
        for f in [hello, *out]:
            s.sendall(f)
            sent.append(f)
        s.settimeout(0.15)
        while s.recv(1 << 16):  # drain replies until the server closes or goes quiet
            pass
    except OSError:
        pass
    finally:
        s.close()
    return sent


def test_fuzzed_frames_hurt_only_their_own_connection():
    with fx.serving("--memory-limit", "512MiB") as server:
        seeds = record_seeds(server)
        assert seeds and all(s[0][:2] == MAGIC for s in seeds)
        assert sum(len(s) for s in seeds) >= 8, "the recorder saw too few frames to seed from"
        rng = random.Random(SEED)
        honest = RemoteBackend(server.address, server.token)
        try:
            honest_program(honest)
            runs_before = honest.server_stats()["runs"]
            cases = frames = honest_runs = 0
            deadline = time.monotonic() + SECONDS
            while time.monotonic() < deadline:
                sent = fuzz_case(server.port, rng.choice(seeds), rng)
                frames += len(sent)
                cases += 1
                if server.proc.poll() is not None:
                    time.sleep(0.5)
                    raise AssertionError(f"the server died on fuzz case {cases} (seed {SEED}); its frames:\n"
                                         + "\n".join(describe(f) for f in sent)
                                         + f"\nserver stderr: {server.stderr_tail()}")
                if cases % 25 == 0:
                    honest_program(honest)
                    honest_runs += 1
            honest_program(honest)
            fuzz_runs = honest.server_stats()["runs"] - runs_before - honest_runs - 1
            assert server.proc.poll() is None
            assert honest.stats.extra["connections"] == 1, "the honest client's connection was closed"
            print(f"\nfuzz: {cases} cases, {frames} frames, {fuzz_runs} programs run, in {SECONDS:.0f} s "
                  f"(seed {SEED})")
            assert cases >= 20
            assert fuzz_runs >= cases // 10, "mutated conversations no longer reach the executor"
        finally:
            honest.close()


# -- op-level mutation: valid frames, hostile argument values ----------------------------------------
@dataclass
class OpSample:
    """One real call of a vetted op: its arguments with each tensor as an input, what it returned."""

    op: str
    args: list
    kwargs: dict
    inputs: list[torch.Tensor]
    outputs: list[TensorMeta]
    multi: bool


class _Calls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        snapshot = _tree_map(lambda t: t.detach().clone(), (list(args), dict(kwargs)))
        out = func(*args, **kwargs)
        self.calls.append((op_name(func), snapshot, out))
        return out


def _tree_map(fn, value):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_tree_map(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: _tree_map(fn, v) for k, v in value.items()}
    return value


def _op_programs() -> list:
    """Small programs whose aten calls seed the op fuzzer; every index-taking vetted op is among them."""
    g = torch.Generator().manual_seed(0)
    x, w, i = torch.randn(4, 6, generator=g), torch.randn(10, 6, generator=g), torch.tensor([3, 0, 9, 2])
    img, lp = torch.randn(2, 3, 8, 8, generator=g), torch.randn(8, 2, 5, generator=g).log_softmax(2)
    bag = nn.EmbeddingBag(10, 6, mode="sum")
    return [
        lambda: F.embedding(i, w), lambda: bag(i, torch.tensor([0, 2])),
        lambda: nn.EmbeddingBag(10, 6, mode="max")(i, torch.tensor([0, 1])),
        lambda: bag(i, torch.tensor([0, 3]), per_sample_weights=torch.rand(4)),
        lambda: x.gather(1, torch.tensor([[0, 5], [1, 1], [2, 0], [3, 4]])),
        lambda: x.clone().scatter_(1, torch.tensor([[0], [5], [2], [1]]), 2.0),
        lambda: torch.zeros(4, 6).scatter_add_(0, torch.tensor([[1, 2, 3, 0, 1, 2]]), x[:1]),
        lambda: torch.zeros(4, 6).scatter_reduce(0, torch.tensor([[1, 2, 3, 0, 1, 2]]), x[:1], "amax"),
        lambda: x.index_select(1, torch.tensor([5, 0])), lambda: x[torch.tensor([3, -1])],
        lambda: x[:, torch.tensor([1, 2])], lambda: x[x > 0],
        lambda: x.clone().index_put_((torch.tensor([0, 3]),), torch.ones(6)),
        lambda: x.clone().index_copy_(0, torch.tensor([2, 1]), torch.ones(2, 6)),
        lambda: torch.zeros(5, 6).index_reduce_(0, torch.tensor([0, 4, 4, 1]), x, "prod"),
        lambda: x.take(torch.tensor([0, 23, -1])), lambda: x.masked_scatter(x > 0, torch.ones(24)),
        lambda: torch.segment_reduce(x.flatten(), "sum", lengths=torch.tensor([10, 14])),
        lambda: torch.segment_reduce(x.flatten(), "max", offsets=torch.tensor([0, 5, 24])),
        lambda: F.ctc_loss(lp, torch.tensor([[1, 2, 3], [4, 1, 0]]), torch.tensor([8, 7]),
                           torch.tensor([3, 2])),
        lambda: F.ctc_loss(lp, torch.tensor([1, 2, 3, 4, 1]), [8, 7], [3, 2]),
        lambda: F.cross_entropy(x, torch.tensor([0, 5, 2, 1])),
        lambda: F.cross_entropy(x, torch.tensor([0, 5, -100, 1]), ignore_index=-100),
        lambda: F.nll_loss(x.log_softmax(1), torch.tensor([1, 2, 3, 4])),
        lambda: F.multi_margin_loss(x, torch.tensor([1, 2, 3, 4])),
        lambda: torch.bincount(i, minlength=12), lambda: torch.repeat_interleave(torch.tensor([1, 0, 3])),
        lambda: torch.searchsorted(torch.tensor([0.0, 1, 3, 2]), x, sorter=torch.tensor([0, 1, 3, 2])),
        lambda: F.max_pool2d(img, 2), lambda: F.avg_pool2d(img, 2), lambda: F.adaptive_avg_pool2d(img, 3),
        lambda: F.conv2d(img, torch.randn(4, 3, 3, 3, generator=g), padding=1),
        lambda: F.interpolate(img, scale_factor=2), lambda: F.interpolate(img, size=5, mode="bilinear"),
        lambda: F.layer_norm(x, (6,)), lambda: F.batch_norm(img, torch.zeros(3), torch.ones(3)),
        lambda: F.group_norm(img, 3), lambda: x.softmax(1), lambda: x.topk(2), lambda: x.sort(1),
        lambda: x.kthvalue(2), lambda: x.cumsum(0), lambda: x @ w.T, lambda: torch.bmm(img[0], img[1]),
        lambda: F.scaled_dot_product_attention(img, img, img),
        lambda: x.view(6, 4), lambda: x.reshape(-1), lambda: x[None].expand(3, 4, 6), lambda: x.permute(1, 0),
        lambda: x.as_strided((2, 2), (1, 3), 1), lambda: x.narrow(1, 2, 3), lambda: x.select(0, 2),
        lambda: x[1:3, ::2], lambda: torch.cat([x, x]), lambda: torch.stack([x, x], 1), lambda: x.split(2),
        lambda: x.repeat(2, 1), lambda: F.pad(x, (1, 2)), lambda: F.pad(img, (1, 1, 1, 1), mode="reflect"),
        lambda: x.flip(0), lambda: x.roll(2, 1), lambda: x.tril(), lambda: x.unfold(1, 2, 2),
        lambda: torch.arange(2, 11, 3), lambda: torch.zeros(3, 4), lambda: torch.full((2,), 3.5),
        lambda: torch.empty(5), lambda: torch.eye(3), lambda: torch.linspace(0, 1, 7),
        lambda: x.new_zeros(2, 3), lambda: x.new_empty(4), lambda: torch.tril_indices(4, 3),
        lambda: torch.randn(3, 4), lambda: torch.rand_like(x), lambda: torch.randint(0, 5, (6,)),
        lambda: torch.randperm(7), lambda: torch.multinomial(x.softmax(1), 2),
        lambda: F.dropout(x, 0.5, training=True), lambda: x.clamp(-1, 1),
        lambda: torch.where(x > 0, x, w[:4]), lambda: x.to(torch.float16), lambda: x.sum(1),
        lambda: x.amax(0), lambda: x.std(1), lambda: x.nonzero(),
        lambda: torch.unique(i), lambda: torch.fft.rfft(x), lambda: x.clone().add_(1).mul_(2),
        lambda: x.clone().copy_(w[:4]), lambda: x.masked_fill(x > 0, 0.0), lambda: x.diag_embed(),
        lambda: x.clone().resize_(8, 6), lambda: x.clone().resize_as_(w), lambda: x.clone().t_(),
        lambda: x.clone().unsqueeze_(0), lambda: x.clone().as_strided_((3, 2), (2, 3), 1),
        lambda: torch._foreach_add_([x.clone(), w[:4].clone()], [w[:4], x], alpha=2),
        lambda: torch.quantile(x, torch.tensor([0.1, 0.9])),
    ]


def _training_step() -> None:
    """One step's backward: the ops that take the forward's saved indices (pool, bag, CTC, NLL)."""
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, 8, 8, generator=g)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(36, 5), nn.LayerNorm(5))
    emb, bag = nn.Embedding(10, 6), nn.EmbeddingBag(10, 6, mode="max")
    i = torch.tensor([3, 0, 9, 2])
    lp = torch.randn(8, 2, 5, generator=g, requires_grad=True)
    loss = (F.cross_entropy(net(img), torch.tensor([1, 4])) + emb(i).sum()
            + bag(i, torch.tensor([0, 2])).sum()
            + F.ctc_loss(lp.log_softmax(2), torch.tensor([[1, 2, 3], [4, 1, 0]]), [8, 7], [3, 2]))
    loss.backward()


def op_samples() -> list[OpSample]:
    """Calls of vetted ops, each replayable as a one-node graph (tensor arguments as its inputs)."""
    rec = _Calls()
    with rec:
        for program in [*_op_programs(), _training_step]:
            program()
    out: dict[tuple, OpSample] = {}
    for name, (args, kwargs), result in rec.calls:
        tensors = [result] if isinstance(result, torch.Tensor) else [
            t for t in result if isinstance(t, torch.Tensor)] if isinstance(result, (tuple, list)) else []
        if name not in VETTED or not tensors or any(not isinstance(t, torch.Tensor) for t in
                                                    (result if isinstance(result, (tuple, list)) else [])):
            continue
        inputs: list[torch.Tensor] = []

        def as_input(t: torch.Tensor, inputs=inputs) -> Ref:
            inputs.append(t.contiguous())
            return Ref(len(inputs) - 1)

        args, kwargs = _tree_map(as_input, (list(args), dict(kwargs)))
        kwargs.pop("device", None)
        kwargs.pop("generator", None)  # a generator cannot travel: the node's seed stands for it
        key = (name, len(inputs), str(args)[:80])
        out.setdefault(key, OpSample(name, args, kwargs, inputs, [TensorMeta.of(t) for t in tensors],
                                     not isinstance(result, torch.Tensor)))
    return list(out.values())


HOSTILE_INTS = [-1, -2, 0, 1, 7, 255, 2**31 - 1, 2**31, 2**32 + 1, 2**40, -(2**40), 2**62, -(2**62),
                2**63 - 1]
HOSTILE_FLOATS = [float("nan"), float("inf"), -float("inf"), 1e38, -1e38, 0.0, -0.0, 1e-45, 2.0**70]
ODD_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
              torch.bfloat16, torch.float64, torch.complex64]


def _hostile_tensor(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    t = t.clone()
    how = rng.randrange(4)
    if how == 0 and t.numel():  # a few elements out of range (the index values an attacker picks)
        flat = t.reshape(-1)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(flat.numel())
            if t.dtype.is_floating_point or t.dtype.is_complex:
                flat[pos] = rng.choice(HOSTILE_FLOATS)
            elif t.dtype == torch.bool:
                flat[pos] = not bool(flat[pos])
            else:
                info = torch.iinfo(t.dtype)
                flat[pos] = max(info.min, min(info.max, rng.choice(HOSTILE_INTS)))
        return t
    if how == 1 and t.dim():  # reversed order: unsorted offsets, decreasing lengths
        return t.flip(-1)
    if how == 2:  # another dtype
        return t.to(rng.choice(ODD_DTYPES))
    return torch.empty(0, dtype=t.dtype) if rng.random() < 0.5 else t.reshape(-1)  # another shape


def _hostile_value(v, rng: random.Random):
    if type(v) is bool:
        return not v
    if type(v) is int:
        return rng.choice(HOSTILE_INTS)
    if type(v) is float:
        return rng.choice(HOSTILE_FLOATS)
    if isinstance(v, torch.dtype):
        return rng.choice(ODD_DTYPES)
    if isinstance(v, list) and v and all(type(x) is int for x in v):
        v = list(v)
        how = rng.randrange(3)
        if how == 0:
            v[rng.randrange(len(v))] = rng.choice(HOSTILE_INTS)
        elif how == 1:
            v.append(rng.choice(HOSTILE_INTS))
        else:
            v.pop()
        return v
    return rng.choice([None, -1, 2**40, [], [2**40]])


def mutate_sample(s: OpSample, rng: random.Random) -> tuple[Graph, list[torch.Tensor], str]:
    """A one-node graph of ``s`` with one argument made hostile, its inputs, and what changed."""
    args, kwargs, inputs, outputs = list(s.args), dict(s.kwargs), list(s.inputs), list(s.outputs)
    slots = [("input", k) for k in range(len(inputs))] + [("arg", k) for k, a in enumerate(args)
                                                        if not isinstance(a, (Ref, list))
                                                        or (isinstance(a, list) and a and type(a[0]) is int)]
    slots += [("kwarg", k) for k, v in kwargs.items() if not isinstance(v, Ref)] + [("output", 0)]
    kind, where = rng.choice(slots)
    if kind == "input":
        inputs[where] = _hostile_tensor(inputs[where], rng)
    elif kind == "arg":
        args[where] = _hostile_value(args[where], rng)
    elif kind == "kwarg":
        kwargs[where] = _hostile_value(kwargs[where], rng)
    else:  # the declared output: the client's metadata lies
        m = outputs[0]
        outputs[0] = TensorMeta(tuple(rng.choice([0, 1, 2**20, 2**40]) for _ in m.shape), m.stride, m.dtype)
    n = len(inputs)
    nodes = [Node(k, INPUT, (k,), {}, (TensorMeta.of(t),)) for k, t in enumerate(inputs)]
    seed = rng.randrange(1 << 30) if rng.random() < 0.7 else None  # input k is node k: the Refs hold
    nodes.append(Node(n, s.op, tuple(args), kwargs, tuple(outputs), s.multi, seed=seed))
    return Graph(nodes, [Ref(n, 0)]), inputs, f"{s.op} {kind} {where}"


def test_hostile_op_arguments_hurt_only_their_own_run():
    samples = op_samples()
    fuzzed_ops = {s.op for s in samples}
    index_ops = {op for op in VETTED if VETTED[op] == "checked"}
    assert len(fuzzed_ops) >= 80 and len(fuzzed_ops & index_ops) >= 15, sorted(fuzzed_ops & index_ops)
    with fx.serving("--memory-limit", "512MiB") as server:
        rng = random.Random(SEED)
        honest = RemoteBackend(server.address, server.token)
        fuzzer = RemoteBackend(server.address, server.token)
        outcomes: Counter[str] = Counter()
        try:
            honest_program(honest)
            cases = honest_runs = 0
            deadline = time.monotonic() + SECONDS
            while time.monotonic() < deadline:
                sample = rng.choice(samples)
                graph, inputs, what = mutate_sample(sample, rng)
                if LOG:
                    LOG.write(f"{cases}: {what}\n{graph}\n")
                    LOG.flush()
                try:
                    fuzzer.run(graph, inputs, fetch=[0], keep=[], constants={})
                    outcomes["ran"] += 1
                except genie.GenieError as e:
                    outcomes[type(e).__name__] += 1
                except (TypeError, ValueError, RuntimeError, OverflowError) as e:  # refused by our own client
                    outcomes[f"client {type(e).__name__}"] += 1
                cases += 1
                if server.proc.poll() is not None or _WORKER_DIED.search(server.stderr_tail()):
                    time.sleep(0.5)
                    raise AssertionError(f"the server died on op fuzz case {cases} (seed {SEED}): {what}\n"
                                         f"{graph}\nserver stderr: {server.stderr_tail()}")
                if cases % HONEST_EVERY == 0:
                    honest_program(honest)  # raises on a wrong answer
                    honest_runs += 1
            honest_program(honest)
            assert server.proc.poll() is None
            assert honest.stats.extra["connections"] == 1, "the honest client's connection was closed"
            print(f"\nop fuzz: {cases} cases over {len(fuzzed_ops)} vetted ops "
                  f"({len(fuzzed_ops & index_ops)} with checked arguments), in {SECONDS:.0f} s "
                  f"(seed {SEED}): "
                  f"{dict(outcomes)}; the honest client's {honest_runs + 1} runs all right")
            assert cases >= 50
            assert outcomes["ran"] >= cases // 20, "hostile calls no longer reach the ops"
            assert outcomes["RemoteExecutionError"] >= cases // 20, "no hostile value was caught"
        except BaseException:
            print(f"server stderr: {server.stderr_tail()}")
            raise
        finally:
            honest.close()
            fuzzer.close()
