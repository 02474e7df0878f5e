"""Tenant worker processes: where client programs run, one process per tenant.

The front process (``_front``) never runs a client op. Before its event loop starts it forks a
*zygote*: a copy that has imported torch and Genie and runs no event loop; the zygote forks one
worker per tenant on request, in milliseconds and sharing the imported pages. A worker holds its
tenant's constants, templates, schedules and kept values (``Server``) and serves the connections the
front hands it: after the handshake the front passes the client's socket itself (``SCM_RIGHTS``),
so the data path has no extra hop. A crash, an OOM kill or a CUDA device-side assert ends that
worker only: its clients lose their connection, the front logs why, and the tenant's next
connection starts a new worker. Other tenants see nothing.

Control channels are ``AF_UNIX``/``SOCK_SEQPACKET`` socket pairs carrying one small JSON object per
message (and file descriptors beside it). Both ends are the server's own processes::

    front -> zygote   {"spawn": tenant}                 zygote -> front  {"spawned": pid} + fd
                                                        zygote -> front  {"exited": pid, "how": ...}
    front -> worker   {"adopt": conn, "peer": ...} + fd worker -> front  {"ready": device, "pid": pid}
                                                        worker -> front  {"failed": why} (at start)
                                                        worker -> front  {"closed": conn}

A worker exits when its control channel closes (the front is gone). With ``--memory-limit`` a
worker's data segment is capped (``RLIMIT_DATA``) at what it holds at start plus the limit plus
``CAP_SLACK``, so every byte a run allocates counts, workspaces included: past the cap an allocation
fails, and that run fails with RemoteMemoryError. On CUDA the caching allocator is capped too
(``set_per_process_memory_fraction``).
"""

from __future__ import annotations

import array
import contextlib
import functools
import json
import os
import resource
import select
import signal
import socket
import sys
import traceback
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from genie.server._serve import Config

CAP_SLACK = 256 << 20  # beyond --memory-limit: the interpreter, threads, graphs being parsed
MAX_CONTROL = 64 << 10  # bytes of one control message


# -- control messages ------------------------------------------------------------------------------
def send_control(sock: socket.socket, msg: dict, fd: int | None = None) -> None:
    """Send one control message (blocking socket), with ``fd`` beside it."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
    sock.sendmsg([json.dumps(msg).encode()], anc)


async def asend_control(sock: trio.socket.SocketType, msg: dict, fd: int | None = None) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
    await sock.sendmsg([json.dumps(msg).encode()], anc)


def _parse(data: bytes, ancdata: list) -> tuple[dict | None, int | None]:
    fds = array.array("i")
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, None
    extra = list(fds[1:])
    for fd in extra:  # one at most is expected: never leak the rest
        os.close(fd)
    return json.loads(data), (fds[0] if fds else None)


async def arecv_control(sock: trio.socket.SocketType) -> tuple[dict | None, int | None]:
    """The next control message and the fd beside it; (None, None) when the other end closed."""
    try:
        data, ancdata, _, _ = await sock.recvmsg(MAX_CONTROL, socket.CMSG_SPACE(4 * 4))
    except OSError:
        return None, None
    return _parse(data, ancdata)


def recv_control(sock: socket.socket) -> tuple[dict | None, int | None]:
    try:
        data, ancdata, _, _ = sock.recvmsg(MAX_CONTROL, socket.CMSG_SPACE(4 * 4))
    except OSError:
        return None, None
    return _parse(data, ancdata)


def control_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


# -- the zygote --------------------------------------------------------------------------------------
def start_zygote(config: Config) -> socket.socket:
    """Fork the zygote (call before any event loop or thread of ours starts); returns the front's end
    of its control channel."""
    front_end, zygote_end = control_pair()
    pid = os.fork()
    if pid == 0:  # the zygote
        front_end.close()
        code = 0
        try:
            _zygote(zygote_end, config)
        except BaseException:  # noqa: BLE001  # a zygote never returns into the front's code
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    zygote_end.close()
    return front_end


def _zygote(sock: socket.socket, config: Config) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the front decides
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while True:
        ready, _, _ = select.select([sock], [], [], 0.5)
        _reap(sock)
        if not ready:
            continue
        msg, _ = recv_control(sock)
        if msg is None:  # the front is gone: so are we (workers see their own channels close)
            return
        tenant = msg.get("spawn")
        if isinstance(tenant, str):
            pid, front_end = _fork_worker(sock, config, tenant)
            send_control(sock, {"spawned": pid, "tenant": tenant}, front_end.fileno())
            front_end.close()


def _reap(sock: socket.socket) -> None:
    """Collect exited workers and tell the front how each ended."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if os.WIFSIGNALED(status):
            try:
                how = f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
            except ValueError:
                how = f"killed by signal {os.WTERMSIG(status)}"
        else:
            how = f"exited with status {os.WEXITSTATUS(status)}"
        try:
            send_control(sock, {"exited": pid, "how": how})
        except OSError:
            return


def _fork_worker(zygote_sock: socket.socket, config: Config, tenant: str) -> tuple[int, socket.socket]:
    front_end, worker_end = control_pair()
    pid = os.fork()
    if pid == 0:  # the worker
        zygote_sock.close()
        front_end.close()
        code = 0
        try:
            run_worker(worker_end, config, tenant)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    worker_end.close()
    return pid, front_end


# -- a worker ------------------------------------------------------------------------------------------
def run_worker(ctrl: socket.socket, config: Config, tenant: str) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the zygote's reaping is not ours to inherit
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    trio.run(_serve_tenant, ctrl, config, tenant)


def cap_memory(limit: int | None) -> int | None:
    """Cap this process's data segment at what it holds now plus ``limit`` plus CAP_SLACK (None: no
    cap). Returns the cap in bytes."""
    if not limit:
        return None
    cap = _data_bytes() + limit + CAP_SLACK
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    return cap


def _data_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) << 10
    return 0


async def _serve_tenant(ctrl_std: socket.socket, config: Config, tenant: str) -> None:
    from genie.server._handler import ConnectionHandler
    from genie.server._peers import serve_lent
    from genie.server._serve import Server, cuda_problem

    ctrl = trio.socket.from_stdlib_socket(ctrl_std)
    problem = cuda_problem(config)
    if problem is not None:
        await asend_control(ctrl, {"failed": problem})
        return
    try:
        server = Server(config, tenant=tenant)
    except Exception as e:  # the device would not start: say so to the front, which reports it
        await asend_control(ctrl, {"failed": f"{type(e).__name__}: {e}"})
        return
    server.memory_cap = cap_memory(config.limits.memory_limit)
    await asend_control(ctrl, {"ready": str(server.device), "pid": os.getpid()})

    async def serve_one(conn_id: int, fd: int, peer: str, transfer: str | None) -> None:
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        server.open_connections += 1
        try:
            if transfer is not None:  # a peer server claiming one lent value, and nothing else
                await serve_lent(server, sock, transfer, peer)
            else:
                await ConnectionHandler(server, sock, peer).serve()
        except Exception as e:  # never let one connection take the worker down
            print(f"genie serve: {peer}: internal error: {e!r}", file=sys.stderr, flush=True)
        finally:
            server.open_connections -= 1
            with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                await asend_control(ctrl, {"closed": conn_id})

    async with trio.open_nursery() as nursery:
        if server.store is not None:  # so ``has`` knows the store's digests (sidecars: quick)
            nursery.start_soon(functools.partial(trio.to_thread.run_sync, server.store.index_all,
                                                 abandon_on_cancel=True))
        while True:
            msg, fd = await arecv_control(ctrl)
            if msg is None:
                break  # the front is gone
            if fd is None or type(msg.get("adopt")) is not int:
                if fd is not None:
                    os.close(fd)
                continue
            transfer = msg.get("transfer")
            nursery.start_soon(serve_one, msg["adopt"], fd, str(msg.get("peer", "?")),
                               transfer if type(transfer) is str else None)
        nursery.cancel_scope.cancel()
