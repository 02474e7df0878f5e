"""Which earlier requests of one connection a request waits for, so that concurrent runs act as if
they ran one at a time in arrival order.

The work loop admits requests one at a time, in arrival order (``Order.admit``), and runs each in a
task of its own once the earlier ones it depends on have ended (``Ticket.wait``). A ticket's
``keys`` say what it touches:

    ("h", handle)    a handle it reads, fetches or frees, or names for a value it will keep
    ("p", address)   the storage of a kept value it reads (a view kept under another handle, such
                     as one layer of a KV cache, shares it)

A ticket waits for every earlier unfinished ticket whose keys meet its own. So a decode step that
writes a cache in place keeps its order with the steps before and after it, a free waits for the
runs reading its handle, a fetch for the run keeping it; two sessions' steps (disjoint residents),
a prefill and an ``execute`` of fresh inputs run at once. Conservative on purpose: two runs that
only read one resident still go in order, and a handle that an unfinished run will keep, whose
storage is not known yet, carries all the keys of that run (its value can alias only what that
run touched).

Handles are checked against the logical state, what one-at-a-time execution would hold at this
point of the arrival order: a handle a waiting free will drop is gone already, one a waiting run
will keep exists already; when that run fails, its readers fail naming it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import trio

from genie._errors import GenieError
from genie.server._residency import Residents

FAILED_MEMORY = 1024  # names of failed runs remembered, so a late reader still learns why
Key = tuple[str, int]


@dataclass(eq=False)
class Ticket:
    """One admitted request: what it touches, the earlier tickets it waits for, and its end."""

    id: int
    keys: frozenset[Key]
    after: list[Ticket]
    producers: dict[int, Ticket]  # handle it reads -> the unfinished run that will keep it
    names: tuple[int, ...] = ()
    frees: tuple[int, ...] = ()
    done: trio.Event = field(default_factory=trio.Event)
    failed: bool = False

    async def wait(self) -> None:
        """Until every earlier ticket it depends on has ended; GenieError if a run that was to keep
        a handle it reads failed."""
        for t in self.after:
            await t.done.wait()
        self.after = []  # let ended tickets go (a chain of them would grow with the connection)
        producers, self.producers = self.producers, {}
        for h, p in producers.items():
            if p.failed:
                raise _never_kept(h, p.id)


class Order:
    """One connection's unfinished tickets, and the handles they will keep or drop."""

    def __init__(self, residents: Residents) -> None:
        self.residents = residents
        self.pending: list[Ticket] = []  # unfinished, in arrival order (at most --max-runs long)
        self._producer: dict[int, Ticket] = {}  # handle -> the unfinished run that will keep it
        self._freeing: dict[int, Ticket] = {}  # kept handle -> the unfinished free that drops it
        self._failed: OrderedDict[int, int] = OrderedDict()  # handle -> id of the run that failed to keep it

    def live(self, handle: int) -> bool:
        """Whether ``handle`` is in use once every admitted request has run."""
        return handle in self._producer or (handle in self.residents and handle not in self._freeing)

    def reads(self, handles: Iterable[int]) -> tuple[set[Key], dict[int, Ticket]]:
        """The keys of reading ``handles``, and the unfinished runs that will keep some of them;
        GenieError (the client's) naming a handle that is not there."""
        keys: set[Key] = set()
        producers: dict[int, Ticket] = {}
        for h in dict.fromkeys(handles):
            p = self._producer.get(h)
            if p is not None:
                producers[h] = p
                keys |= p.keys
            elif h in self.residents and h not in self._freeing:
                keys.add(("h", h))
                keys.add(("p", self.residents.storage(h)))
            elif h in self._failed:
                raise _never_kept(h, self._failed[h])
            else:
                raise GenieError(f"handle {h} is not resident on this connection (freed, or kept by "
                                 "another connection)")
        return keys, producers

    def admit(self, req_id: int, keys: set[Key], producers: dict[int, Ticket] | None = None, *,
              names: Sequence[int] = (), frees: Sequence[int] = ()) -> Ticket:
        """A ticket for the request that arrived now, after every earlier one it meets."""
        keys = keys | {("h", h) for h in (*names, *frees)}
        frozen = frozenset(keys)
        after = [t for t in self.pending if not t.keys.isdisjoint(frozen)]
        ticket = Ticket(req_id, frozen, after, producers or {}, tuple(names), tuple(frees))
        self.pending.append(ticket)
        for h in names:
            self._producer[h] = ticket
            self._failed.pop(h, None)
        for h in frees:
            self._producer.pop(h, None)
            self._freeing[h] = ticket
        return ticket

    def finish(self, ticket: Ticket, ok: bool) -> None:
        """``ticket`` ended (``ok``: a run kept its values); the tickets waiting for it go on."""
        ticket.failed = not ok
        self.pending.remove(ticket)
        for h in ticket.names:
            if self._producer.get(h) is ticket:
                del self._producer[h]
                if not ok:
                    self.forget(h, ticket.id)
        for h in ticket.frees:
            if self._freeing.get(h) is ticket:
                del self._freeing[h]
        ticket.done.set()

    def forget(self, handle: int, run_id: int) -> None:
        """``handle`` was to be kept by run ``run_id``, which failed: a later reader is told so."""
        self._failed[handle] = run_id
        self._failed.move_to_end(handle)
        if len(self._failed) > FAILED_MEMORY:
            self._failed.popitem(last=False)


def _never_kept(handle: int, run_id: int) -> GenieError:
    return GenieError(f"handle {handle} was never kept: run {run_id}, which was to keep it, failed "
                      "(see that run's error)")
