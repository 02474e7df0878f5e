"""The tiny-op round trip, against a raw socket ping-pong, on loopback; and where its time goes.

    python bench/roundtrip.py                 # 2000 round trips of each kind
    python bench/roundtrip.py --n 500

Side by side in one run, each peer a separate process on 127.0.0.1:
- raw:   a 300-byte ping-pong between two Python processes, blocking ``sendall`` / ``recv_into``
         (the floor any Python RPC pays: two syscalls and two wake-ups of a process);
- genie: ``(x + i).cpu()`` on a device-mode tensor (``x`` lives on a real ``genie serve``), a new
         Python int each call: record, flush, the sync bridge, the wire, the server's loop, the
         run, the reply, waking the caller.
Reported: min and median microseconds of each, genie/raw of the medians (target <= 3).

The direct path (``runtime._direct``): when the bridge's loop is idle, the calling thread writes the
run's frame and reads its reply itself; ``direct share`` is the fraction of runs that went so.

Then the hop breakdown: the same loop again with both processes tracing each hop with
``perf_counter_ns`` (one clock for the two processes on Linux), the median microseconds between
consecutive hops. Tracing wraps the functions from outside (this file), so the product carries no
tracing code; the wrappers add ~1 us per hop, so the traced loop is a little slower than the plain
one above.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _common import report  # noqa: E402

PING = 300
PONG = textwrap.dedent("""
    import socket, sys
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
    print(ls.getsockname()[1], flush=True)
    c, _ = ls.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(PING))
    while True:
        got = 0
        while got < len(buf):
            n = c.recv_into(buf[got:])
            if not n: sys.exit(0)
            got += n
        c.sendall(buf)
""").replace("PING", str(PING))


class RawPingPong:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PONG], stdout=subprocess.PIPE)
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.out = bytes(PING)
        self.back = memoryview(bytearray(PING))

    def once(self) -> int:
        t0 = time.perf_counter_ns()
        self.sock.sendall(self.out)
        got = 0
        while got < PING:
            got += self.sock.recv_into(self.back[got:])
        return time.perf_counter_ns() - t0

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(10)


# -- hop tracing --------------------------------------------------------------------------------
LOG: list[tuple[str, int]] = []


def _trace(owner: object, name: str, enter: str | None, leave: str | None) -> None:
    """Wrap ``owner.name`` to log ``enter``/``leave`` with the time (sync or async functions)."""
    fn = owner[name] if isinstance(owner, dict) else getattr(owner, name)
    now = time.perf_counter_ns
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*a, **k):
            if enter:
                LOG.append((enter, now()))
            try:
                return await fn(*a, **k)
            finally:
                if leave:
                    LOG.append((leave, now()))
    else:
        @functools.wraps(fn)
        def wrapper(*a, **k):
            if enter:
                LOG.append((enter, now()))
            try:
                return fn(*a, **k)
            finally:
                if leave:
                    LOG.append((leave, now()))
    if isinstance(owner, dict):
        owner[name] = wrapper
    else:
        setattr(owner, name, wrapper)


def trace_client() -> None:
    from genie.runtime import _connection, _direct, _remote, _session

    _trace(_remote.RemoteBackend, "run", "client: call", "client: caller woken")
    _trace(_remote.RemoteBackend, "_start_run", "client: in bridge loop", None)
    _trace(_session.Session, "result", None, "client: result built")
    _trace(_session.Session, "post_run", None, "client: run encoded+posted")
    _trace(_connection, "send_parts", "client: write task", "client: sent")
    _trace(_connection, "receive_message", None, "client: reply parsed")
    # the direct path (runtime._direct): the caller's thread writes the run and reads the reply
    _trace(_direct, "_post", "client: encode (direct)", "client: written (direct)")
    _trace(_direct, "wait", None, "client: reply read (direct)")


def trace_server() -> None:
    from genie.server import _handler, _reader, _requests

    _trace(_handler, "receive_message", None, "server: frame parsed")
    _trace(_requests.REQUESTS, "run", "server: work task", "server: reply built")
    _trace(_reader.RunReader, "read", "server: run handler", "server: graph filled+checked")
    _trace(_requests, "_compute", "server: bound inputs", None)
    _trace(_requests, "run_job", "server: run starts", "server: run done")
    _trace(_handler, "send_parts", "server: send task", "server: sent")


def serve_traced(out: str, argv: list[str]) -> None:
    """``genie serve`` with the server hops traced. The traces are installed before the zygote forks,
    so the tenant's worker (where the hops happen) has them; it writes its log to ``out`` when it
    ends (the server was stopped: SIGTERM)."""
    trace_server()
    from genie.server import _workers

    run_worker = _workers.run_worker

    def traced_worker(*args: object) -> None:
        try:
            run_worker(*args)
        finally:
            Path(out).write_text(json.dumps(LOG))

    _workers.run_worker = traced_worker
    from genie.cli import main
    main(argv)


class Server:
    def __init__(self, trace_to: str | None) -> None:
        argv = ["serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu"]
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import roundtrip; "
                f"roundtrip.serve_traced({trace_to!r}, {argv!r})" if trace_to else
                f"from genie.cli import main; main({argv!r})")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GENIE_TOKEN": "bench"}
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
        line: list[bytes] = []
        t = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(60)
        self.address = line[0].split()[-1].decode() if line else ""
        if not self.address:
            self.proc.kill()
            raise RuntimeError("genie serve did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def genie_loop(n: int) -> list[int]:
    import torch

    x = torch.ones(4, device="remote_accelerator:0")
    times = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        y = (x + i).cpu()
        times.append(time.perf_counter_ns() - t0)
        if y[0].item() != 1 + i:
            raise AssertionError(f"wrong answer {y} for 1 + {i}")
    return times


def hops(client: list, server: list) -> list[dict]:
    """Median microseconds between consecutive hops, per round trip (from one client call to the next)."""
    events = sorted([*client, *server], key=lambda e: e[1])
    trips, cur = [], None
    for tag, t in events:
        if tag == "client: call":
            cur = [(tag, t)]
            trips.append(cur)
        elif cur is not None:
            cur.append((tag, t))
    steps: dict[tuple[str, str], list[int]] = {}
    order: list[tuple[str, str]] = []
    for trip in trips[len(trips) // 10:]:  # skip the warm-up
        for (a, ta), (b, tb) in zip(trip, trip[1:], strict=False):
            if (a, b) not in steps:
                steps[(a, b)] = []
                order.append((a, b))
            steps[(a, b)].append(tb - ta)
    n = len(trips) - len(trips) // 10
    # a hop seen in most trips is the path; rare ones (a free going out on its own) are noise
    rows = [{"from": a, "to": b, "median us": statistics.median(steps[(a, b)]) / 1e3,
             "seen": len(steps[(a, b)])} for a, b in order if len(steps[(a, b)]) >= n // 2]
    # outside the backend: the caller checks its answer, records ``x + i`` and flushes it (lazy/)
    outside = [nxt[0][1] - max(t for tag, t in prev if tag == "client: caller woken")
               for prev, nxt in zip(trips[len(trips) // 10:], trips[len(trips) // 10 + 1:], strict=False)
               if any(tag == "client: caller woken" for tag, _ in prev)]
    if outside:
        rows.append({"from": "client: caller woken", "to": "client: call (next; record + flush)",
                     "median us": statistics.median(outside) / 1e3, "seen": len(outside)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    import genie

    raw = RawPingPong()
    srv = Server(None)
    try:
        genie.connect(srv.address, token="bench")
        for _ in range(200):
            raw.once()
        genie_loop(200)
        raw_t, gen_t = [], []
        for _ in range(args.n // 100):  # alternate, so that both see the same machine
            raw_t += [raw.once() for _ in range(100)]
            gen_t += genie_loop(100)
    finally:
        srv.stop()
        raw.close()
    extra = genie.stats()
    direct = extra.get("direct_runs", 0) / max(1, extra.get("runs", 1))
    raw_med, gen_med = statistics.median(raw_t) / 1e3, statistics.median(gen_t) / 1e3
    rows = [{"what": "raw ping-pong, 300 B", "min us": min(raw_t) / 1e3, "median us": raw_med},
            {"what": "genie (x + i).cpu()", "min us": min(gen_t) / 1e3, "median us": gen_med}]

    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "server.json")
        srv = Server(log)
        try:
            genie.connect(srv.address, token="bench")
            trace_client()
            genie_loop(min(args.n, 1000))
        finally:
            srv.stop()
        for _ in range(100):  # the worker writes it as it ends, just after the server process
            if os.path.exists(log):
                break
            time.sleep(0.1)
        server_log = [tuple(e) for e in json.loads(Path(log).read_text())]
    breakdown = hops(LOG, server_log)
    report("roundtrip", rows, {"genie/raw (medians)": gen_med / raw_med, "target": "genie/raw <= 3",
                               "n": args.n, "cpu_count": os.cpu_count(), "direct share": direct,
                               "flush replays": extra.get("flush_replays", 0), "hops": breakdown})
    print(f"genie/raw, medians: {gen_med / raw_med:.2f} (target <= 3); direct share {direct:.2f}\n")
    width = max(len(f"{h['from']} -> {h['to']}") for h in breakdown)
    for h in breakdown:
        print(f"{h['from'] + ' -> ' + h['to']:<{width}}  {h['median us']:8.1f} us")


if __name__ == "__main__":
    main()
