"""Server caches are keyed by what the server derives, never by the client's word: a stage schedule
is cached under the digest of its content, so one client cannot make another's key name a different
schedule (which once broke the other client's connection). Templates are keyed by the skeleton
digest the server computes itself."""

from __future__ import annotations

import _server_fixtures as fx
import torch
from _server_fixtures import handshake, reply, using

import genie
from genie.graph import StageSchedule, split
from genie.runtime._remote import RemoteBackend
from genie.transport import Message

server = fx.server  # fixture, by name






def victim_graph():
    return genie.trace(lambda x: torch.relu(x @ x) + 1, torch.randn(8, 8))


def test_a_schedules_key_is_the_digest_of_its_content():
    a = genie.schedule(victim_graph()).stage_schedule()
    assert StageSchedule.from_wire(a.to_wire()) == a and StageSchedule.from_wire(a.to_wire()).key == a.key
    other = StageSchedule(a.starts, tuple(r + 1 for r in a.ready) + (0,))
    assert other.key != a.key
    forged = {**other.to_wire(), "key": a.key}  # a key sent with a schedule is not taken as given
    assert StageSchedule.from_wire(forged).key == other.key != a.key


def test_a_schedule_sent_under_another_clients_key_cannot_break_that_client(server):
    graph = victim_graph()
    plan = genie.schedule(graph)
    sched = plan.stage_schedule()
    x = torch.randn(8, 8)
    with using(RemoteBackend(server.address, server.token)) as victim:
        (got,) = victim.run(plan.graph, [x], fetch=[0], keep=[], constants=plan.graph.constants,
                            stages=sched).fetched  # sent whole: the server caches it
        torch.testing.assert_close(got, torch.relu(x @ x) + 1)

        # the attacker's own two-output graph, with a schedule that fits it and not the victim's,
        # sent under the victim's key
        mine = genie.trace(lambda y: (torch.relu(y) + 1, torch.tanh(y) * 2), torch.randn(4, 4))
        computes = [n.id for n in mine.nodes if n.op not in ("genie.input", "genie.const")]
        forged = {"key": sched.key, "starts": [computes[0]], "ready": [0, 0]}
        s, p = handshake(server)
        try:
            fields = {"id": 1, "graph": "bytes", "inputs": 1, "consts": [], "fetch": [0, 1], "keep": [],
                      "stages": forged}
            s.sendall(p.send_bytes(Message("run", fields, [mine.to_bytes(), torch.randn(4, 4)])))
            assert reply(s, p).kind in ("result", "part")  # a schedule that fits its own graph runs
        finally:
            s.close()

        for _ in range(3):  # the victim names its schedule by key alone now: still its own
            x = torch.randn(8, 8)
            (got,) = victim.run(plan.graph, [x], fetch=[0], keep=[], constants=plan.graph.constants,
                                stages=sched).fetched
            torch.testing.assert_close(got, torch.relu(x @ x) + 1)
        assert victim.stats.extra["connections"] == 1  # never reconnected


def test_template_keys_are_the_servers_own_digest(server):
    """A slot registration whose ``check`` is not the digest the server computes from the graph is
    refused, and nothing is cached under the client's word."""
    graph = victim_graph()
    parts = split(graph)
    assert parts is not None
    s, p = handshake(server)
    try:
        fields = {"id": 1, "graph": "bytes", "inputs": 1, "consts": [], "fetch": [0], "keep": [],
                  "slot": 0, "check": "0" * len(parts.digest)}
        s.sendall(p.send_bytes(Message("run", fields, [graph.to_bytes(), torch.randn(8, 8)])))
        err = reply(s, p)
        assert err.kind == "error" and "template mismatch" in err["message"]
    finally:
        s.close()
    with using(RemoteBackend(server.address, server.token)) as b:
        fx.check_served(b)
