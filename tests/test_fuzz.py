"""A protocol fuzzer against a real ``genie serve``: mutated frames of a real client.

Seeds are the frames a real client sent (recorded by a loopback proxy) while it uploaded weights,
ran traced and device-mode programs, streamed inputs, fetched, freed and asked for stats. Each fuzz
case replays one recorded conversation on a fresh authenticated connection, with some frames
mutated: a JSON header field replaced by a hostile value, bytes flipped, lengths changed, frames cut
short or dropped. Throughout, an honest client keeps one connection open.

It asserts that the server never dies, that the honest client's connection is never closed, and
that it still gets correct results. ``GENIE_FUZZ_SECONDS`` sets the budget (default 40 s);
``GENIE_FUZZ_SEED`` the seed. The case and frame counts are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time

import _server_fixtures as fx
import torch

import genie
from genie.runtime._remote import RemoteBackend
from genie.transport._protocol import MAGIC, PREFIX

SECONDS = float(os.environ.get("GENIE_FUZZ_SECONDS", "40"))
SEED = int(os.environ.get("GENIE_FUZZ_SEED", "0"))

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
