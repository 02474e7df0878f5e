"""Every limit the server puts on a peer, in one table: its default, its unit and its flag.

The protocol enforces the framing limits (header bytes, descriptors, payload bytes) on bytes alone;
the server enforces the rest (graph nodes, template slots, timeouts, memory, connections). ``genie
serve`` makes one flag per row that has one, so a limit is added by adding a row here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limit:
    default: int | float | None  # None: no limit unless the flag sets one
    unit: str  # "bytes", "count" or "seconds"; how the flag's value is parsed
    flag: str | None  # the ``genie serve`` flag, or None when fixed
    help: str


LIMITS: dict[str, Limit] = {
    "max_frame": Limit(8 << 30, "bytes", "--max-frame", "largest message payload accepted"),
    "max_header": Limit(4 << 20, "bytes", "--max-header",
                        "largest JSON header of one message (parsed on the event loop: keep it small)"),
    "greeting_max_header": Limit(64 << 10, "bytes", None,
                                 "largest header before the handshake; such frames carry no payload"),
    "max_buffers": Limit(16384, "count", "--max-buffers", "buffer descriptors in one message"),
    "max_nodes": Limit(100_000, "count", "--max-nodes", "nodes in one graph"),
    "max_slots": Limit(1024, "count", None, "templates one connection may register in its slots"),
    "max_templates": Limit(1024, "count", None, "templates and stage schedules the server caches"),
    "memory_limit": Limit(None, "bytes", "--memory-limit",
                          "bytes the server may hold: constants, kept values, every run's predicted "
                          "peak and incoming frames (e.g. 20GiB); least recently used unpinned "
                          "constants are evicted to stay under it"),
    "stream_timeout": Limit(30.0, "seconds", "--stream-timeout",
                            "longest wait for a run's next streamed input before the run fails"),
    "idle_timeout": Limit(300.0, "seconds", "--idle-timeout",
                          "close a connection with nothing to do for this long (0: never)"),
    "hello_timeout": Limit(5.0, "seconds", "--hello-timeout", "time a new connection has to say hello"),
    "max_unauthenticated": Limit(64, "count", "--max-unauthenticated",
                                 "connections still to say hello at once; more are closed at once"),
    "max_connections": Limit(256, "count", "--max-connections",
                             "open connections past their hello; more are refused"),
    "max_runs": Limit(16, "count", "--max-runs",
                      "requests of one connection in progress at once (runs, and fetches and frees "
                      "waiting for them); past it the server stops reading that connection"),
    "workers": Limit(None, "count", "--workers",
                     "programs computing at once on the device, across all connections (default: 1 on "
                     "a GPU, up to 4 on the CPU)"),
}


@dataclass(frozen=True, slots=True)
class Limits:
    """One server's limits (the defaults of ``LIMITS`` unless set)."""

    max_frame: int = LIMITS["max_frame"].default  # type: ignore[assignment]
    max_header: int = LIMITS["max_header"].default  # type: ignore[assignment]
    greeting_max_header: int = LIMITS["greeting_max_header"].default  # type: ignore[assignment]
    max_buffers: int = LIMITS["max_buffers"].default  # type: ignore[assignment]
    max_nodes: int = LIMITS["max_nodes"].default  # type: ignore[assignment]
    max_slots: int = LIMITS["max_slots"].default  # type: ignore[assignment]
    max_templates: int = LIMITS["max_templates"].default  # type: ignore[assignment]
    memory_limit: int | None = LIMITS["memory_limit"].default  # type: ignore[assignment]
    stream_timeout: float = LIMITS["stream_timeout"].default  # type: ignore[assignment]
    idle_timeout: float = LIMITS["idle_timeout"].default  # type: ignore[assignment]
    hello_timeout: float = LIMITS["hello_timeout"].default  # type: ignore[assignment]
    max_unauthenticated: int = LIMITS["max_unauthenticated"].default  # type: ignore[assignment]
    max_connections: int = LIMITS["max_connections"].default  # type: ignore[assignment]
    max_runs: int = LIMITS["max_runs"].default  # type: ignore[assignment]
    workers: int | None = LIMITS["workers"].default  # type: ignore[assignment]

    def replace(self, **changes: int | float | None) -> Limits:
        """These limits with ``changes``; a value of None keeps the default (an unset flag)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


assert [f.name for f in dataclasses.fields(Limits)] == list(LIMITS), "Limits and LIMITS must agree"
