"""Moving tensors through Genie, against raw sockets, on loopback.

    python bench/transport.py                 # 1 .. 256 MiB
    python bench/transport.py --sizes 1 1024  # MiB

Both sides are separate processes on 127.0.0.1, and both are store-and-forward echoes: the peer
receives the whole tensor, then sends it back.
- raw:   blocking ``sendall`` / ``recv_into`` a preallocated buffer (the ceiling);
- genie: ``RemoteBackend.run`` of a graph returning its input, through ``genie serve``: framing,
         the template plan cache, the trio event loops, a fresh result tensor each time.
Reported: GB/s of payload moved (both directions), best of a few, raw and genie alternating;
genie/raw (target >= 0.85). Small tensors are latency-bound: ``bench/roundtrip.py`` measures that
round trip and where its time goes, hop by hop.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import torch  # noqa: E402
from _common import report  # noqa: E402
from _server_fixtures import serving  # noqa: E402

from genie.graph import INPUT, Graph, Node, Ref, TensorMeta  # noqa: E402
from genie.runtime._remote import RemoteBackend  # noqa: E402

MiB = 1 << 20
ECHO = textwrap.dedent("""
    import socket, struct, sys
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
    print(ls.getsockname()[1], flush=True)
    c, _ = ls.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(8); view = None
    while True:
        got = 0
        while got < 8:
            n = c.recv_into(memoryview(buf)[got:], 8 - got)
            if not n: sys.exit(0)
            got += n
        size, = struct.unpack("<Q", buf)
        if view is None or len(view) < size:
            view = memoryview(bytearray(size))
        got = 0
        while got < size:
            got += c.recv_into(view[got:size], size - got)
        c.sendall(view[:size])
""")


class RawEcho:
    """The baseline peer: a process echoing length-prefixed blobs with blocking sockets."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE)
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.back = memoryview(bytearray(0))

    def echo(self, data: memoryview) -> float:
        size = data.nbytes
        if self.back.nbytes < size:
            self.back = memoryview(bytearray(size))
        t0 = time.perf_counter()
        self.sock.sendall(size.to_bytes(8, "little"))
        self.sock.sendall(data)
        got = 0
        while got < size:
            got += self.sock.recv_into(self.back[got:size], size - got)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(10)


def identity(numel: int) -> Graph:
    meta = TensorMeta((numel,), (1,), torch.float32)
    return Graph([Node(0, INPUT, (0,), outputs=(meta,), storages=(0,))], [Ref(0)])


def genie_echo(b: RemoteBackend, x: torch.Tensor, g: Graph) -> float:
    t0 = time.perf_counter()
    (y,) = b.run(g, [x], fetch=[0], keep=[], constants={}).fetched
    dt = time.perf_counter() - t0
    assert y.shape == x.shape
    return dt


def measure(sizes: list[int], reps: int) -> dict[int, tuple[float, float]]:
    """Best seconds per size, (raw, genie); the two alternate so that both see the same machine."""
    out = {}
    raw = RawEcho()
    with serving() as srv:
        b = RemoteBackend(srv.address, srv.token)
        try:
            for size in sizes:
                x = torch.randn(size // 4)
                data = memoryview(x.numpy()).cast("B")
                g = identity(size // 4)
                genie_echo(b, x, g)  # warm: the plan, the buffers
                best_raw = best_genie = float("inf")
                for _ in range(reps):
                    best_raw = min(best_raw, raw.echo(data))
                    best_genie = min(best_genie, genie_echo(b, x, g))
                (y,) = b.run(g, [x], fetch=[0], keep=[], constants={}).fetched
                assert torch.equal(y, x)
                out[size] = (best_raw, best_genie)
        finally:
            b.close()
            raw.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256], help="MiB")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    sizes = [m * MiB for m in args.sizes]
    times = measure(sizes, args.reps)
    rows = []
    for size in sizes:
        raw, gen = times[size]
        r, g = 2 * size / raw / 1e9, 2 * size / gen / 1e9
        rows.append({"MiB": size // MiB, "raw GB/s": r, "genie GB/s": g, "genie/raw": g / r,
                     "raw ms": raw * 1e3, "genie ms": gen * 1e3})
    big = [r["genie/raw"] for r in rows if r["MiB"] >= 16]
    report("transport", rows, {"target": "genie/raw >= 0.85", "reps": args.reps,
                               "min ratio >= 16 MiB": min(big) if big else None,
                               "cpu_count": os.cpu_count()})


if __name__ == "__main__":
    main()
