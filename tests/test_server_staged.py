"""The plan drives a real server: streamed inputs, early outputs and frees, proved by the server's own
timeline (``genie.profile()`` collects it), plus the bad inputs of the staged protocol."""

from __future__ import annotations

import socket

import _server_fixtures as fx
import pytest
import torch
import trio
from _server_fixtures import raw_connection, read_until_closed, using
from test_semantic_workload import example, traced

import genie
from genie.graph import StageSchedule
from genie.runtime._remote import RemoteBackend
from genie.transport import Message, Protocol
from genie.transport._protocol import VERSION

server, remote = fx.server, fx.remote  # fixtures, by name


def spans(prof, process: str, name: str):
    found = [s for s in prof.spans if s.process == process and s.name.startswith(name)]
    assert found, f"no {process} span {name!r} in {sorted({(s.process, s.name) for s in prof.spans})}"
    return found


def two_phase(x, big):
    a = torch.relu(x @ x.T)  # reads x only: runs while big is still arriving
    b = big
    for _ in range(4):  # a last stage that takes a while
        b = torch.tanh(b @ b.T) * 0.1
    return a, b.sum() + a.sum()


# -- the timeline tests --------------------------------------------------------------------------
async def test_first_stage_computes_before_the_large_second_input_has_arrived(remote):
    x, big = torch.randn(32, 32), torch.randn(4096, 2048)  # 4 KB inline, 32 MB streamed
    graph = genie.trace(two_phase, x, big)
    plan = genie.schedule(graph)
    assert plan.stream == (1,) and plan.stages[0].uploads == (0,) and plan.stages[1].uploads == (1,)
    await genie.execute(graph, x, big)  # warm: plan cached on both sides
    with genie.profile() as prof:
        a, total = await genie.execute(graph, x, big)
    (stage0,) = spans(prof, "server", "stage 0")
    (arrival,) = spans(prof, "server", "receive input 1")
    assert stage0.start_ns < arrival.end_ns, (stage0, arrival)  # computing before big was in
    assert stage0.end_ns < arrival.end_ns  # ... and stage 0 even finished first
    (waited,) = spans(prof, "server", "wait input 1")
    assert waited.end_ns >= arrival.end_ns - 1_000_000  # stage 1 waited for it (1 ms of clock slack)
    torch.testing.assert_close(a, torch.relu(x @ x.T))
    assert genie.stats()["streamed_inputs"] >= 2


async def test_early_output_reaches_the_client_before_the_last_stage_ends(remote):
    x, big = torch.randn(256, 256), torch.randn(1024, 1024)
    graph = genie.trace(two_phase, x, big)
    plan = genie.schedule(graph)
    assert plan.stages[0].ready_outputs == (0,) and len(plan.stages) == 2
    with genie.profile() as prof:
        a, total = await genie.execute(graph, x, big)
    (got,) = spans(prof, "client", "download output 0")  # the client's own arrival time
    last = spans(prof, "server", f"stage {len(plan.stages) - 1}")[0]
    assert got.end_ns < last.end_ns - 5_000_000, (got, last)  # well before, past any clock error
    torch.testing.assert_close(a, torch.relu(x @ x.T))
    b = big
    for _ in range(4):
        b = torch.tanh(b @ b.T) * 0.1
    torch.testing.assert_close(total, b.sum() + a.sum(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", ["gpt2", "conv_blocks"])
async def test_server_frees_activations_after_their_last_use(remote, name):
    graph = traced(name)
    with genie.profile() as prof:
        got = await genie.execute(graph, *example(name))
    (run,) = spans(prof, "server", "run")
    peak, total = run.args["peak_bytes"], run.args["activation_bytes"]
    assert 0 < peak < total, (peak, total)
    if name == "gpt2":  # a deep stack: a few layers' worth alive at once
        assert peak < total / 4, (peak, total)
    plan = genie.schedule(graph)
    assert len(spans(prof, "server", "stage ")) == len(plan.stages)
    from genie.server import Interpreter

    want = Interpreter(graph, device=torch.device("cpu"), constants=graph.constants).run(list(example(name)))
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


async def test_trace_has_client_and_server_processes(remote, tmp_path):
    x, big = torch.randn(32, 32), torch.randn(512, 512)
    graph = genie.trace(two_phase, x, big)
    with genie.profile() as prof:
        await genie.execute(graph, x, big)
    trace = prof.export_chrome_trace(tmp_path / "t.json").read_text()
    assert '"genie client' in trace and '"genie server' in trace
    cats = {(s.process, s.cat) for s in prof.spans}
    assert {("client", "upload"), ("client", "download"), ("server", "compute"), ("server", "upload"),
            ("server", "download"), ("server", "wait")} <= cats
    assert "stage 0" in prof.summary(print_=False)


def test_the_server_caches_stage_schedules_under_their_content_key(server, remote):
    """A schedule sent once is named by its key (its content's digest) afterwards, by any connection."""
    x, big = torch.randn(32, 32), torch.randn(512, 512)
    graph = genie.trace(two_phase, x, big)
    plan = genie.semantic.run_scheduler().schedule(graph)  # the plan execute runs
    trio.run(genie.execute, graph, x, big)
    key = plan.stage_schedule().key
    assert key in remote._session.schedules
    s, p = _handshake(server)  # another connection, naming the schedule by key alone
    try:
        msg = _staged_run(plan.graph, key, inputs=2, fetch=[0, 1])
        msg.buffers += [x, big]
        s.sendall(p.send_bytes(msg))
        parts = []
        while (reply := _reply(s, p)).kind == "part":
            parts.append(reply["output"])
        assert reply.kind == "result", reply.fields
        assert parts == reply["early"] == [0]  # output 0 went back when stage 0 ended
        torch.testing.assert_close(reply.buffers[0], two_phase(x, big)[1])
    finally:
        s.close()


# -- bad input: a clear error, and the server serves on ------------------------------------------
def _handshake(server) -> tuple[socket.socket, Protocol]:
    s = raw_connection(server)
    p = Protocol("client")
    s.sendall(p.send_bytes(Message("hello", {"version": VERSION, "token": server.token})))
    while True:
        p.receive_data(s.recv(65536))
        ev = p.next_event()
        if isinstance(ev, Message):
            assert ev.kind == "welcome"
            return s, p


def _staged_run(graph, schedule: dict | str, **extra) -> Message:
    fields = {"id": 7, "graph": "bytes", "inputs": 0, "consts": [], "fetch": [0], "keep": [],
              "stages": schedule, **extra}
    return Message("run", fields, [graph.to_bytes()])


def _reply(s: socket.socket, p: Protocol) -> Message:
    s.settimeout(30)
    while True:
        ev = p.next_event()
        if isinstance(ev, Message):
            return ev
        p.receive_data(s.recv(65536))


def _echo_graph():
    return genie.trace(lambda x: torch.relu(x) + 1, torch.randn(4, 4))


def test_a_wrong_streamed_input_is_the_callers_error(remote):
    graph = _echo_graph()
    plan = genie.schedule(graph)
    with pytest.raises(genie.RemoteExecutionError, match="input 0") as e:
        remote.run(plan.graph, [torch.randn(3, 3)], fetch=[0], keep=[], constants={},
                   stages=plan.stage_schedule(), stream=[0])
    assert e.value.op == "genie.input"
    x = torch.randn(4, 4)
    (got,) = trio.run(genie.execute, graph, x)  # the same connection works on
    torch.testing.assert_close(got, torch.relu(x) + 1)


@pytest.mark.parametrize("schedule, why", [
    ({"key": "k", "starts": [5, 3], "ready": [0]}, "stage schedule"),
    ({"key": "k", "starts": [1], "ready": [4]}, "ready stage"),
    ("no-such-key-ever", "missing"),
])
def test_bad_or_unknown_stage_schedules_are_refused(server, remote, schedule, why):
    graph = _echo_graph()
    s, p = _handshake(server)
    try:
        s.sendall(p.send_bytes(_staged_run(graph, schedule)))
        err = _reply(s, p)
        assert err.kind == "error" and (why in err["message"] or err["kind"] == why), err.fields
        if why == "missing":
            assert err["schedule"] == schedule  # the client re-sends that schedule and retries
    finally:
        s.close()
    x = torch.randn(4, 4)
    (got,) = trio.run(genie.execute, graph, x)
    torch.testing.assert_close(got, torch.relu(x) + 1)


def test_input_frame_for_a_run_that_streams_nothing_closes_only_that_connection(server, remote):
    s, p = _handshake(server)
    try:
        s.sendall(p.send_bytes(Message("input", {"id": 99, "input": 0}, [torch.randn(4)])))
        data = read_until_closed(s)
    finally:
        s.close()
    p.receive_data(data)
    err = p.next_event()
    assert err.kind == "error" and err["kind"] == "protocol" and "streams no inputs" in err["message"]
    x = torch.randn(4, 4)
    (got,) = trio.run(genie.execute, _echo_graph(), x)
    torch.testing.assert_close(got, torch.relu(x) + 1)


async def test_runs_waiting_for_inputs_that_never_come_do_not_block_others(server):
    """More stalled uploads than the server has compute slots: a waiting run lends its slot."""
    graph = _echo_graph()
    sched = genie.schedule(graph).stage_schedule().to_wire()
    stalled = []
    try:
        for _ in range(4):  # the CPU server has at most 4 slots, 2 on this machine
            s, p = _handshake(server)
            s.sendall(p.send_bytes(_staged_run(graph, sched, stream=[0])))  # the input never follows
            stalled.append(s)
        with using(RemoteBackend(server.address, server.token)):
            x = torch.randn(4, 4)
            with trio.fail_after(60):
                (got,) = await genie.execute(graph, x)
            torch.testing.assert_close(got, torch.relu(x) + 1)
    finally:
        for s in stalled:
            s.close()  # their runs fail ("connection ended"), the server lives on
    with using(RemoteBackend(server.address, server.token)) as b:
        x = torch.randn(4, 4)
        (got,) = await genie.execute(graph, x)
        torch.testing.assert_close(got, torch.relu(x) + 1)
        assert b.server_stats()["connections"] >= 6


def test_stage_schedule_checks_what_it_is_given():
    graph = _echo_graph()
    good = genie.schedule(graph).stage_schedule()
    assert StageSchedule.from_wire(good.to_wire()) == good
    good.check(graph)
    with pytest.raises(genie.ProtocolError):
        StageSchedule.from_wire({"key": 1, "starts": [], "ready": []})
    with pytest.raises(genie.ProtocolError, match="first computation"):
        StageSchedule((), good.ready).check(graph)

    def write_after(x):  # the output is written again in a later stage
        y = torch.relu(x)
        z = torch.tanh(x)
        y.add_(z)
        return y

    g = genie.trace(write_after, torch.randn(4, 4))
    computes = [n.id for n in g.nodes if n.op not in ("genie.input", "genie.const")]
    adder = next(n.id for n in g.nodes if n.op.startswith("aten.add_"))
    with pytest.raises(genie.ProtocolError, match="last writer"):
        StageSchedule((computes[0], adder), (0,)).check(g)
    StageSchedule((computes[0], adder), (1,)).check(g)


async def test_in_process_backend_runs_the_same_stages():
    from genie.runtime import LocalBackend

    x, big = torch.randn(32, 32), torch.randn(256, 256)
    graph = genie.trace(two_phase, x, big)
    with using(LocalBackend("cpu")), genie.profile() as prof:
        a, total = await genie.execute(graph, x, big)
    assert len(spans(prof, "server", "stage ")) == len(genie.schedule(graph).stages) == 2
    (run,) = spans(prof, "server", "run")
    assert 0 < run.args["peak_bytes"] <= run.args["activation_bytes"]
    want_a, want_total = two_phase(x, big)
    torch.testing.assert_close(a, want_a)
    torch.testing.assert_close(total, want_total)
