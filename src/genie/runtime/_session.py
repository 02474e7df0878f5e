"""What this process knows about one connection's server-side state, and its rules.

A ``Session`` is owned by ``RemoteBackend`` and touched only in its bridge loop: the constants the
server holds, the plan templates registered (``Slot``), the stage schedules sent, and the handles
of values kept there, including those named by runs not yet answered (``makers``) and those whose
run failed (``failed``: whoever reads one later is told why).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import trio

from genie._errors import ConnectionLostError, GenieError
from genie.graph import RESIDENT, Graph
from genie.runtime._connection import Connection, Waiter
from genie.transport import LIMITS, error_from_message

MAX_SLOTS: int = LIMITS["max_slots"].default  # type: ignore[assignment]  # the server's, per connection


@dataclass
class Slot:
    number: int
    last: np.ndarray
    prev: np.ndarray
    strs: list[str]
    registered_by: int = 0  # the run that registered it: if that run fails, the server may not have


@dataclass
class Session:
    conn: Connection
    known: set[str] = field(default_factory=set)  # constant digests the server holds
    uploading: dict[str, trio.Event] = field(default_factory=dict)
    slots: OrderedDict[str, Slot] = field(default_factory=OrderedDict)  # template digest -> slot
    refused: set[str] = field(default_factory=set)  # templates the server would not register
    plans: set[str] = field(default_factory=set)  # plan keys whose stage schedule the server was sent
    handles: set[int] = field(default_factory=set)  # live values this connection made (or will)
    failed: dict[int, BaseException] = field(default_factory=dict)  # handles whose run failed: why
    makers: dict[int, Waiter] = field(default_factory=dict)  # handle -> its run's waiter, till settled

    def slot_number(self) -> int:
        if len(self.slots) < MAX_SLOTS:  # the lowest free number (a failed registration frees one)
            used = {s.number for s in self.slots.values()}
            return next(n for n in range(MAX_SLOTS) if n not in used)
        _, oldest = self.slots.popitem(last=False)
        return oldest.number  # re-registering overwrites the server's slot

    def forget_registration(self, waiter: Waiter) -> None:
        """A run failed: if it registered a template slot, the server may have refused the graph
        before registering it, so the slot is forgotten (the next run of that template registers it
        again)."""
        for digest, slot in list(self.slots.items()):
            if slot.registered_by == waiter.cancel_id:
                del self.slots[digest]

    def run_failed(self, graph: Graph, waiter: Waiter, names: list[int], error: GenieError) -> None:
        """A run's reply is an error: its handles hold nothing; raise why a value it read was never
        made, if that is the cause."""
        self.forget_registration(waiter)
        self.handles.difference_update(names)
        for h in names:
            self.makers.pop(h, None)
        self.raise_cause(reads_of(graph), error)

    def raise_cause(self, handles: list[int], error: BaseException) -> None:
        """A request failed because a value it reads was never made: raise why that run failed."""
        for h in handles:
            failed = self.failed.get(h)
            if failed is not None:
                raise failed from error
            maker = self.makers.get(h)  # its reply is in, but its caller has not looked yet
            if maker is not None and maker.reply is not None and maker.reply.kind == "error":
                raise error_from_message(maker.reply) from error

    def check_residents(self, graph: Graph) -> None:
        for h in reads_of(graph):
            self.check_handle(h)

    def check_handle(self, h: int) -> None:
        if h in self.handles:
            return
        failed = self.failed.get(h)
        if failed is not None:  # the run that was to make it failed after its caller moved on
            raise failed
        raise ConnectionLostError("a tensor this program reads was kept on a genie server connection "
                                  "that has since been lost (or freed); compute it again")


def reads_of(graph: Graph) -> list[int]:
    """The handles of the kept values ``graph`` reads."""
    return [n.args[0] for n in graph.nodes if n.op == RESIDENT]
