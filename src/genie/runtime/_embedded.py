"""The embedded default: with no server configured, this process starts its own on loopback.

``python -m genie serve --host 127.0.0.1 --port 0`` runs as a child with a random token (passed in
its environment, not on its command line, where other users could read it). The child prints the
port it got; it holds our end of a pipe as its stdin and exits when that closes, so it never
outlives us, even if we are killed. It picks the device itself: CUDA if there is one, else the CPU.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import threading

from genie._errors import ConnectionLostError

START_TIMEOUT = float(os.environ.get("GENIE_EMBEDDED_START_TIMEOUT", "120"))
_LISTENING = re.compile(rb"genie serve listening on (\S+):(\d+)")


class EmbeddedServer:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.token = ""
        self._lock = threading.Lock()

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
        cmd = [sys.executable, "-m", "genie", "serve", "--host", "127.0.0.1", "--port", "0",
               "--exit-on-stdin-eof"]
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
