"""The embedded default: with no server configured, this process starts its own on loopback.

``python -m genie serve --host 127.0.0.1 --port 0`` runs as a child with a random token (passed in
its environment, not on its command line, where other users could read it). The child prints the
port it got; it holds our end of a pipe as its stdin and exits when that closes, so it never
outlives us, even if we are killed. It picks the device itself: CUDA if there is one, else the CPU.

Several (``embedded_set(n)``, ``genie.connect(embedded=n)``, ``GENIE_SERVER=embedded:n``): n such
children, each a device (``remote_accelerator:i``), on ports picked here beforehand so that each can
name all the others in its ``--peers`` allowlist and values move between them directly. A port picked
and let go can be taken by another process before the child binds it: the start is then retried on
new ports.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Sequence

from genie._errors import ConnectionLostError
from genie.transport import free_ports

START_TIMEOUT = float(os.environ.get("GENIE_EMBEDDED_START_TIMEOUT", "120"))
_LISTENING = re.compile(rb"genie serve listening on (\S+):(\d+)")


class EmbeddedServer:
    """``port`` 0: any free one; ``peers``: the other servers of a set it may pull values from."""

    def __init__(self, port: int = 0, peers: Sequence[str] = ()) -> None:
        self.proc: subprocess.Popen | None = None
        self.host = "127.0.0.1"
        self.port = port
        self.peers = list(peers)
        self.token = ""
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def ensure(self) -> tuple[str, int, str]:
        """(host, port, token) of a running embedded server, starting one if there is none."""
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            return self.host, self.port, self.token

    def _start(self) -> None:
        token = secrets.token_hex(16)
        env = {**os.environ, "GENIE_TOKEN": token}
        env.pop("GENIE_SERVER", None)
        cmd = [sys.executable, "-m", "genie", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--exit-on-stdin-eof"] + (["--peers", ",".join(self.peers)] if self.peers else [])
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(START_TIMEOUT)
        m = _LISTENING.search(line[0]) if line else None
        if m is None:
            proc.kill()
            proc.wait()
            raise ConnectionLostError(
                f"the embedded genie server did not start (exit code {proc.returncode}); "
                "set GENIE_SERVER=host:port to use a running one, or GENIE_SERVER=inprocess")
        self.proc, self.token = proc, token
        self.host, self.port = m.group(1).decode(), int(m.group(2))

    def close(self) -> None:
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


def embedded_set(n: int) -> list[EmbeddedServer]:
    """``n`` embedded servers on loopback, started, each allowed to pull from all the others."""
    if n < 1:
        raise ValueError(f"an embedded set needs at least one server, not {n}")
    for attempt in range(3):
        ports = free_ports(n)
        addresses = [f"127.0.0.1:{p}" for p in ports]
        servers = [EmbeddedServer(p, [a for a in addresses if a != addresses[i]])
                   for i, p in enumerate(ports)]
        try:
            for s in servers:
                s.ensure()
            return servers
        except ConnectionLostError:  # a port was taken meanwhile: new ones
            for s in servers:
                s.close()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
