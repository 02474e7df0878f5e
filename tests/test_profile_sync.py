"""Sync points under ``genie.profile()`` and ``GENIE_SYNC_DEBUG=1``, and the Chrome trace's pids.

Every flush of device mode is a run on the server (a round trip when waited for). A profile records
each one with the user's line that forced it (the first frame outside genie and torch, so an HF user
sees transformers' own line), why, and the time spent recording ops before it.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import _server_fixtures as fx
import torch
from _models import gpt2

import genie
from genie._profile import record
from genie.lazy import _lazy
from genie.runtime import LocalBackend

server, remote, any_backend = fx.server, fx.remote, fx.any_backend  # fixtures, by name
DEV = "remote_accelerator:0"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _line() -> int:
    """The line after the caller's: where the statement under test is."""
    return inspect.currentframe().f_back.f_lineno + 1


def test_item_is_blamed_on_this_line(remote):
    me = "test_item_is_blamed_on_this_line"
    x = torch.randn(4, 8, device=DEV)
    with genie.profile() as prof:
        y = (x @ x.T).relu() * 2
        line = _line()
        value = y.sum().item()
    (sp,) = prof.sync_points
    assert (sp.file, sp.line, sp.function, sp.why) == (__file__, line, me, "item")
    assert sp.where.endswith(f"test_profile_sync.py:{line} ({me})")
    assert sp.ops >= 4 and sp.wait and sp.end_ns > sp.start_ns  # mm, relu, mul, sum at least
    assert sp.capture_ops == 5 and sp.capture_ns > 0  # matmul, transpose, relu, mul, sum recorded
    assert value == (x.cpu() @ x.cpu().T).relu().mul(2).sum().item()
    (flush,) = prof.by_cat("sync")
    assert flush.name == "sync item" and flush.args["where"] == sp.where
    text = prof.summary(print_=False)
    assert "sync points: 1 flushes (1 waited for)" in text and f"test_profile_sync.py:{line}" in text


def test_each_way_of_reading_a_value_names_its_reason(any_backend):
    x = torch.randn(6, device=DEV)
    f = genie.compile(lambda a: a * 3 + 1)
    want = []
    with genie.profile() as prof:
        want.append(("item", _line()))
        x.sum().item()
        want.append(("bool", _line()))
        if (x * 2).sum() > 100:
            pass
        want.append(("tolist", _line()))
        (x + 1).tolist()
        want.append(("cpu", _line()))
        (x - 1).cpu()
        want.append(("data-dependent shape", _line()))
        nz = torch.nonzero(x > 0)
        want.append(("print", _line()))
        repr(nz + 1)
        want.append(("equal", _line()))
        torch.equal(x, x + 0)
        want.append(("compile", _line()))
        f(x)
    got = [(sp.why, sp.line) for sp in prof.sync_points]
    assert got == want
    assert all(sp.file == __file__ for sp in prof.sync_points)
    rows = prof.sync_rows()
    assert len(rows) == len(want) and all(n == 1 for _, n, _, _, _ in rows)


async def test_genie_fetch_is_a_sync_point_not_waited_for(remote):
    x = torch.randn(5, device=DEV)
    with genie.profile() as prof:
        line = _line()
        (v,) = await genie.fetch(x * 2)
    (sp,) = prof.sync_points
    assert (sp.why, sp.file, sp.line, sp.wait) == ("fetch", __file__, line, False)
    torch.testing.assert_close(v, x.cpu() * 2)
    assert "(0 waited for)" in prof.sync_summary(print_=False)


def test_nothing_is_watched_outside_a_profile(remote):
    assert _lazy._WATCHED is False  # the one global the per-op hot path reads
    x = torch.randn(3, device=DEV)
    with genie.profile() as prof:
        assert _lazy._WATCHED is True
    assert _lazy._WATCHED is False
    (x * 2).sum().item()  # after the profile: not recorded
    assert prof.sync_points == [] and prof.spans == []
    with genie.profile() as outer, genie.profile() as inner:
        (x + 1).cpu()
    assert len(outer.sync_points) == len(inner.sync_points) == 1
    assert _lazy._WATCHED is False


def test_hf_generate_sync_points_are_transformers_lines(remote):
    import transformers

    hf = os.path.dirname(transformers.__file__) + os.sep
    model = gpt2().to(DEV)
    ids = torch.randint(1, 128, (1, 5))
    with genie.profile() as prof, torch.no_grad():
        out = model.generate(ids.to(DEV), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)
    sps = prof.sync_points
    assert len(sps) >= 3  # at least one per decode step (the stopping criteria's check)
    assert all(sp.file.startswith(hf) for sp in sps), [sp.where for sp in sps]
    assert not any(sp.file.startswith(os.path.dirname(genie.__file__)) for sp in sps)
    assert {sp.why for sp in sps} <= {"bool", "item", "cpu", "tolist", "data-dependent shape"}
    text = prof.sync_summary(print_=False)
    assert "transformers/generation/utils.py:" in text
    assert prof.total("capture") > 0 and sum(sp.capture_ops for sp in sps) > 100


def test_sync_debug_logs_each_line_to_stderr(server, tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent("""\
        import torch, genie
        x = torch.randn(4, device="remote_accelerator:0")
        v = (x * 2).sum().item()  # randn, mul, sum pending
        print("value", v)
    """))
    env = {**os.environ, "GENIE_SERVER": server.address, "GENIE_TOKEN": server.token, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.path.join(ROOT, "src")}
    on = subprocess.run([sys.executable, str(prog)], env={**env, "GENIE_SYNC_DEBUG": "1"}, cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
    assert on.returncode == 0, on.stderr[-2000:]
    assert "genie.sync: item at prog.py:3 (<module>): 3 ops, " in on.stderr, on.stderr[-2000:]
    assert "value" in on.stdout
    off = subprocess.run([sys.executable, str(prog)], env={**env, "GENIE_SYNC_DEBUG": "0"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert off.returncode == 0 and "genie.sync" not in off.stderr, off.stderr[-2000:]


def _trace(prof) -> tuple[list[dict], dict[int, str]]:
    events = json.loads(json.dumps(prof.chrome_trace()))["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    return [e for e in events if e["ph"] == "X"], names


async def test_chrome_trace_gives_server_spans_the_server_pid(server, remote):
    x = torch.randn(16, 16)
    graph = genie.trace(lambda a: torch.relu(a @ a.T) + 1, x)
    with genie.profile() as prof:
        (got,) = await genie.execute(graph, x)
    torch.testing.assert_close(got, torch.relu(x @ x.T) + 1)
    spid, me = remote.server_stats()["pid"], os.getpid()  # the tenant worker that ran it
    assert spid != me and spid in server.pids()
    xs, names = _trace(prof)
    stages = [e for e in xs if e["name"].startswith("stage ")]
    assert stages and all(e["pid"] == spid for e in stages)
    server_spans = {s.name for s in prof.spans if s.process == "server"}
    assert server_spans and all(e["pid"] == spid for e in xs if e["name"] in server_spans)
    assert all(e["pid"] == me for e in xs if e["cat"] == "upload" and e["name"] not in server_spans)
    assert names[spid] == f"genie server (pid {spid})" and names[me] == f"genie client (pid {me})"


async def test_in_process_server_is_labelled_as_ours():
    x = torch.randn(16, 16)
    graph = genie.trace(lambda a: torch.relu(a @ a.T) + 1, x)
    with fx.using(LocalBackend("cpu")), genie.profile() as prof:
        await genie.execute(graph, x)
        record("client work", "compute", 0, 1)
    xs, names = _trace(prof)
    me = os.getpid()
    assert {e["pid"] for e in xs} == {me}
    assert names == {me: f"genie client + server (in process, pid {me})"}
    threads = [e["args"]["name"] for e in json.loads(json.dumps(prof.chrome_trace()))["traceEvents"]
               if e["ph"] == "M" and e["name"] == "thread_name"]
    assert any(t.startswith("server thread") for t in threads)
    assert any(t.startswith("client thread") for t in threads)
