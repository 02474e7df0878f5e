"""ServerPool: one Ray actor per ``genie serve``, in a placement group; Genie's protocol carries the
tensors, Ray only starts and supervises the servers (as vLLM's Ray executor runs plain actors in
placement-group bundles).

Call tree::

    ServerPool(num_servers, num_gpus_per_server=1, device=None)
      _ray_up()                 ray.init(address="auto") (a running cluster), else a local one
      placement_group(bundles, "PACK"), wait until it is placed
      _free_port.remote() in each bundle        a port free on that bundle's node (host, port)
      _ServerActor.remote(...) in each bundle   max_restarts: Ray restarts a dead one with the same
                                                arguments, so on the same port with the same token
        __init__: genie serve --host H --port P --peers <all the others> (token in its environment)
                  a thread watches it: when the server exits, the actor exits, and Ray restarts it
      .addresses .token .pids .shutdown()

What a restart loses: everything that server held (kept values such as a KV cache, uploaded
weights, plans). The client's next use of a value kept there raises ConnectionLostError naming the
server; it reconnects by itself, re-uploads weights by digest, and recomputes what it needs.
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

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from genie.transport import free_ports

READY_TIMEOUT = 120.0  # seconds for the placement group and the servers to come up
_LISTENING = re.compile(rb"genie serve listening on (\S+):(\d+)")
# The actors' code travels by value: a Ray worker then never imports genie (and torch) just to host
# a server, which runs in a process of its own anyway.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@ray.remote
def _free_port(host: str) -> tuple[str, int]:
    """A port free now on this node (picked here, so that a restarted actor can take it again)."""
    host = host or ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((host, 0))
        return host, s.getsockname()[1]


class _ServerActor:
    """Hosts one ``genie serve``; exits when it does, so that Ray restarts both."""

    def __init__(self, host: str, port: int, token: str, peers: list[str], device: str | None) -> None:
        env = {**os.environ, "GENIE_TOKEN": token, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.pop("GENIE_SERVER", None)
        cmd = [sys.executable, "-m", "genie", "serve", "--host", host, "--port", str(port),
               "--exit-on-stdin-eof"] + (["--peers", ",".join(peers)] if peers else []) \
            + (["--device", device] if device else [])
        deadline = time.monotonic() + 30  # a restart may find the port still held for a moment
        while True:
            # a process group of its own: the front, its zygote and tenant workers live and die together
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                         start_new_session=True)
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            m = _LISTENING.search(line)
            if m is not None:
                break
            self.proc.wait()
            if time.monotonic() > deadline:
                raise RuntimeError(f"genie serve did not start on {host}:{port} (exit code "
                                   f"{self.proc.returncode})")
            time.sleep(0.2)
        self.address = f"{host}:{port}"
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # its workers too, and their clients' connections
            os.killpg(self.proc.pid, signal.SIGKILL)
        os._exit(1)  # the server died: so does this actor, and Ray restarts it (max_restarts)

    def info(self) -> tuple[str, int]:
        """(address, server pid); a server that has died takes this actor down first (``_watch``)."""
        if not _alive(self.proc.pid):
            os._exit(1)
        return self.address, self.proc.pid


class ServerPool:
    """``num_servers`` genie servers as Ray actors in one placement group; each is a device:
    ``genie.connect(pool.addresses, token=pool.token)`` makes server i ``remote_accelerator:i``.

    ``num_gpus_per_server``: the GPUs each bundle reserves (0 on a CPU-only cluster, None: 1 if the
    cluster has GPUs, else 0); ``device``:
    each server's ``--device`` (default: its GPU if it has one, else the CPU). Uses the running
    cluster (``ray.init(address="auto")``) or starts a local one of ``num_cpus`` CPUs. An actor
    that dies is restarted up to ``max_restarts`` times, on the same address and token.
    """

    def __init__(self, num_servers: int, num_gpus_per_server: float | None = 1, device: str | None = None, *,
                 num_cpus_per_server: float = 1, num_cpus: int | None = None, max_restarts: int = 3) -> None:
        if num_servers < 1:
            raise ValueError(f"a pool needs at least one server, not {num_servers}")
        self.token = secrets.token_hex(16)
        self._started_ray = _ray_up(num_cpus)
        self._pg = None
        self._actors: list = []
        gpus = ray.cluster_resources().get("GPU", 0)
        if num_gpus_per_server is None:  # as the cluster has: one each, or none at all
            num_gpus_per_server = 1 if gpus else 0
        if num_gpus_per_server * num_servers > gpus:
            self.shutdown()
            raise ValueError(f"{num_servers} servers of {num_gpus_per_server} GPU(s) each need more GPUs "
                             f"than this Ray cluster has ({gpus:g}); num_gpus_per_server=0 runs them on CPUs")
        bundle = {"CPU": float(num_cpus_per_server)} | ({"GPU": float(num_gpus_per_server)}
                                                        if num_gpus_per_server else {})
        self._pg = placement_group([dict(bundle) for _ in range(num_servers)], strategy="PACK")
        try:
            ray.get(self._pg.ready(), timeout=READY_TIMEOUT)
            where = [_in_bundle(self._pg, i)
                     for i in range(num_servers)]
            if self._started_ray:  # a local cluster: this machine's loopback, ports picked here
                ports = [("127.0.0.1", p) for p in free_ports(num_servers)]
            else:  # a port free on each bundle's node, asked there
                ports = ray.get([_free_port.options(scheduling_strategy=s, num_cpus=num_cpus_per_server)
                                 .remote("") for s in where], timeout=READY_TIMEOUT)
            addresses = [f"{h}:{p}" for h, p in ports]
            actor = ray.remote(_ServerActor)
            for i, ((h, p), s) in enumerate(zip(ports, where, strict=True)):
                peers = [a for j, a in enumerate(addresses) if j != i]
                self._actors.append(actor.options(
                    scheduling_strategy=s, max_restarts=max_restarts, max_task_retries=-1,
                    num_cpus=num_cpus_per_server, num_gpus=num_gpus_per_server,
                ).remote(h, p, self.token, peers, device))
            self.addresses = addresses
            self.pids  # noqa: B018 -- every server is up once each actor answers
        except BaseException:
            self.shutdown()
            raise

    @property
    def pids(self) -> list[int]:
        """The server processes (``genie serve``'s front process, which leads a process group with
        its workers), one per device; asking waits for an actor that is being restarted."""
        return [pid for _, pid in ray.get([a.info.remote() for a in self._actors], timeout=READY_TIMEOUT)]

    def shutdown(self) -> None:
        """Stop the actors (their servers exit with them), free the placement group, and stop Ray if
        this pool started it."""
        for a in self._actors:
            ray.kill(a, no_restart=True)
        self._actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _alive(pid: int) -> bool:
    """Whether child ``pid`` runs: not a zombie either. (``Popen.poll`` answers None while the
    ``_watch`` thread's ``wait`` holds the process's lock, so it cannot tell.)"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel whether the pid exists at all
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _in_bundle(pg, i: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)


def _ray_up(num_cpus: int | None) -> bool:
    """Connect to the running Ray cluster, or start a local one; True if this started it."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address="auto", log_to_driver=False)
        return False
    except ConnectionError:
        pass
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True
