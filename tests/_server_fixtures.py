"""Real ``genie serve`` subprocesses on 127.0.0.1 for the server tests (no mocks).

Import the fixtures into a test module: ``from _server_fixtures import server, remote``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

import genie
from genie.runtime import _backend as backend_module
from genie.runtime import set_backend
from genie.runtime._remote import RemoteBackend
from genie.transport import VERSION, Message, Protocol

_LISTENING = re.compile(rb"genie serve listening on (\S+):(\d+)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ServerProcess:
    """One ``python -m genie serve`` child, in a process group of its own with its zygote and tenant
    workers; ``kill``, ``pause`` (SIGSTOP) and ``restart`` act on the whole group."""

    def __init__(self, *args: str, token: str | None = None, port: int = 0) -> None:
        self.args = args
        self.token = token if token is not None else secrets.token_hex(8)
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GENIE_TOKEN": self.token}
        env.pop("GENIE_SERVER", None)
        cmd = [sys.executable, "-m", "genie", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--device", "cpu", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     start_new_session=True)
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        m = _LISTENING.search(line[0]) if line else None
        if m is None:
            self._signal(signal.SIGKILL)
            raise RuntimeError(f"genie serve did not start: {self.proc.stderr.read().decode()[-2000:]}")
        self.port = int(m.group(2))
        # drain stderr so a chatty server never blocks on a full pipe; keep its tail for failures
        self._stderr = bytearray()
        threading.Thread(target=self._drain, args=(self.proc.stderr, self._stderr), daemon=True).start()

    @staticmethod
    def _drain(pipe, tail: bytearray) -> None:
        while chunk := pipe.read1(1 << 16):
            tail += chunk
            del tail[: max(0, len(tail) - (64 << 10))]

    def stderr_tail(self) -> str:
        return self._stderr.decode(errors="replace")[-4000:]

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def pids(self) -> list[int]:
        """The front process, its zygote and its tenant workers (the process group)."""
        assert self.proc is not None
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError):
                    if os.getpgid(int(entry)) == self.proc.pid:
                        out.append(int(entry))
        return out

    def restart(self) -> None:
        """Kill, then start again on the same port (clients reconnect to the same address)."""
        self.kill()
        deadline = time.monotonic() + 10
        while True:
            try:
                self.start()
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdout, self.proc.stderr) if self.proc else ():
            with contextlib.suppress(OSError):
                f.close()


@contextlib.contextmanager
def serving(*args: str, **kw) -> Iterator[ServerProcess]:
    s = ServerProcess(*args, **kw)
    try:
        yield s
    finally:
        s.close()


@contextlib.contextmanager
def using(b):
    """Make backend ``b`` genie's inside the block (LazyTensors, ``genie.stats()``); close it after."""
    old = backend_module._backend
    set_backend(b)
    try:
        yield b
    finally:
        set_backend(old)
        if hasattr(b, "close"):
            b.close()


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One server shared by the tests that do not break it."""
    with serving() as s:
        yield s


@pytest.fixture
def remote(server: ServerProcess) -> Iterator[RemoteBackend]:
    """A fresh connection to ``server``, installed as genie's backend for one test."""
    with using(RemoteBackend(server.address, server.token)) as b:
        yield b


@pytest.fixture(params=["server", "inprocess"])
def any_backend(request):
    """A fresh connection to the shared server, then the in-process backend: the same test on both."""
    from genie.runtime import LocalBackend

    if request.param == "server":
        s = request.getfixturevalue("server")
        with using(RemoteBackend(s.address, s.token)) as b:
            yield b
    else:
        with using(LocalBackend("cpu")) as b:
            yield b


def check_served(b: RemoteBackend) -> None:
    """``b``'s connection still computes right answers."""
    import torch

    w = torch.randn(8, 8)
    graph = genie.trace(lambda x: torch.relu(x @ w) + 1, torch.randn(2, 8))
    x = torch.randn(2, 8)
    (got,) = b.run(graph, [x], fetch=[0], keep=[], constants=graph.constants).fetched
    torch.testing.assert_close(got, torch.relu(x @ w) + 1)


def raw_connection(server: ServerProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return s


def read_until_closed(s: socket.socket, limit: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not)."""
    s.settimeout(limit)
    chunks = []
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def stats_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], int)}


__all__ = ["ServerProcess", "any_backend", "check_served", "genie", "raw_connection",
           "read_until_closed", "remote", "server",
           "serving", "stats_delta", "using"]


def handshake(srv: ServerProcess) -> tuple[socket.socket, Protocol]:
    """A raw socket past the hello (the welcome read), and the client protocol state that goes
    with it: for tests that speak the protocol by hand."""
    s = raw_connection(srv)
    p = Protocol("client")
    s.sendall(p.send_bytes(Message("hello", {"version": VERSION, "token": srv.token})))
    assert reply(s, p).kind == "welcome"
    return s, p


def reply(s: socket.socket, p: Protocol, timeout: float = 60) -> Message:
    """The next message on a raw connection (fails if the server closes it first)."""
    s.settimeout(timeout)
    while True:
        ev = p.next_event()
        if isinstance(ev, Message):
            return ev
        data = s.recv(1 << 20)
        assert data, "the server closed the connection"
        p.receive_data(data)
