"""The session's trust boundary against real ``genie serve`` processes: who may listen without a token,
cancelling a run stops the server's work, TLS, and the one table of error kinds on the wire."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import _server_fixtures as fx
import pytest
import torch
import trio
from _server_fixtures import serving, using

import genie
from genie._errors import (
    AuthenticationError,
    ConnectionLostError,
    ProtocolError,
    RemoteExecutionError,
    RemoteMemoryError,
    RemoteProtocolError,
    UnsupportedOpError,
)
from genie.runtime._remote import RemoteBackend, backend_from_env
from genie.transport import (
    CLIENT,
    ERROR_KINDS,
    SERVER,
    VERSION,
    Message,
    MissingOnServerError,
    Protocol,
    RunCancelledError,
    error_from_message,
    error_message,
)

trustme = pytest.importorskip("trustme")  # a test dependency (Makefile setup): certificates made here


def _echo(x):
    return torch.relu(x) + 1


def _run_echo(b: RemoteBackend) -> None:
    """One small run through ``b`` (installed as genie's backend) that must come back right."""
    x = torch.randn(4, 4)
    (got,) = trio.run(genie.execute, genie.trace(_echo, x), x)
    torch.testing.assert_close(got, torch.relu(x) + 1)


# -- 9: no token, loopback only ----------------------------------------------------------------------
def _serve_cmd(*args: str) -> tuple[list[str], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GENIE_TOKEN", None)
    return [sys.executable, "-m", "genie", "serve", "--port", "0", "--device", "cpu", *args], env


def test_no_token_on_a_non_loopback_address_is_refused():
    cmd, env = _serve_cmd("--host", "0.0.0.0")
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    assert done.returncode == 2, done
    err = done.stderr.decode()
    assert "without a token" in err and "--insecure" in err and "0.0.0.0" in err, err
    assert b"listening" not in done.stdout  # it never accepted anyone


def test_insecure_serves_any_client_on_all_addresses_and_warns():
    with serving("--host", "0.0.0.0", "--insecure", token="") as s:
        with using(RemoteBackend(s.address, "")) as b:  # reached at 127.0.0.1: bound to every address
            _run_echo(b)
        for _ in range(100):  # the warning is on stderr, which the fixture drains in a thread
            if "WARNING" in s.stderr_tail():
                break
            time.sleep(0.1)
        tail = s.stderr_tail()
        assert "WARNING" in tail and "no token" in tail and "0.0.0.0" in tail, tail


def test_loopback_without_a_token_serves_any_client():
    with serving(token="") as s, using(RemoteBackend(s.address, "")) as b:
        _run_echo(b)
        assert "WARNING" not in s.stderr_tail()


def test_a_token_still_refuses_a_wrong_one_on_loopback():
    with serving(token="secret") as s, pytest.raises(AuthenticationError, match="bad token"):
        RemoteBackend(s.address, "wrong").connect()


# -- 10: cancelling stops the server's work ----------------------------------------------------------
def _long(x, w):
    for _ in range(100):  # ~20 ms a matmul on one thread: seconds if it runs to the end
        x = torch.tanh(x @ w)
    return x.sum(0)


def _long_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g) / 32


def _stats_once_cancelled(b: RemoteBackend, before: dict) -> dict:
    """The server's stats once a run has been cancelled since ``before`` (or after 5 s): ``stats``
    is answered at once, not queued behind the runs of its connection."""
    for _ in range(100):
        stats = b.server_stats()
        if stats.get("cancelled", 0) > before.get("cancelled", 0):
            break
        time.sleep(0.05)
    return stats


async def test_a_cancelled_execute_stops_the_servers_work_and_the_connection_carries_on():
    x, w = _long_inputs()
    graph = genie.trace(_long, x, w)
    assert genie.schedule(graph).stage_schedule() is not None  # a staged run, and the plan is cached
    with serving() as s, using(RemoteBackend(s.address, s.token)) as b:
        b.connect()
        before = b.server_stats()
        with trio.move_on_after(0.3) as scope:
            await genie.execute(graph, x, w)
        assert scope.cancelled_caught  # the call returned at once ...
        mid = _stats_once_cancelled(b, before)
        assert mid["cancelled"] - before.get("cancelled", 0) == 1  # ... and the server stopped it
        assert mid.get("runs", 0) == before.get("runs", 0)  # it never finished

        # another connection's cancels name its own runs only: this one runs to the end
        other = RemoteBackend(s.address, s.token)  # not genie's backend: only its cancels matter
        try:
            other.connect()

            async def cancel_everything() -> None:
                await trio.sleep(0.2)
                sess = await other._connect()
                for i in range(1, 64):
                    sess.conn.post(Message("cancel", {"id": i}), reply=False)

            def cancels_from_other() -> None:
                other.bridge().call(cancel_everything)

            t = threading.Thread(target=cancels_from_other)
            t.start()
            (got,) = await genie.execute(graph, x, w)  # the next call on the same connection works
            t.join()
        finally:
            other.close()
        torch.testing.assert_close(got, _long(x, w), rtol=1e-4, atol=1e-4)
        after = b.server_stats()
        assert after["cancelled"] == mid["cancelled"] and after["runs"] == mid.get("runs", 0) + 1
        full = after["compute_seconds"] - mid.get("compute_seconds", 0)
        stopped = mid["cancelled_seconds"] - before.get("cancelled_seconds", 0)
        assert stopped < full / 2, (stopped, full)  # it stopped early, far before the end


@pytest.fixture
def sigint_raises():
    """Python's Ctrl-C handler, whatever this process inherited (a shell's background job starts
    with SIGINT ignored)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("path", ["execute under trio.run", "blocking call, no stages"])
def test_ctrl_c_cancels_the_run(path, sigint_raises):
    x, w = _long_inputs()
    graph = genie.trace(_long, x, w)
    genie.schedule(graph)
    with serving() as s, using(RemoteBackend(s.address, s.token)) as b:
        b.connect()
        before = b.server_stats()
        main = threading.main_thread().ident
        timer = threading.Timer(0.3, lambda: signal.pthread_kill(main, signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                if path == "execute under trio.run":
                    trio.run(genie.execute, graph, x, w)
                else:  # the bridge's blocking path (what .cpu() uses); the server checks every node
                    b.run(graph, [x, w], fetch=[0], keep=[], constants={})
        finally:
            timer.cancel()
        after = _stats_once_cancelled(b, before)
        assert after.get("cancelled", 0) - before.get("cancelled", 0) == 1
        assert after.get("runs", 0) == before.get("runs", 0)
        _run_echo(b)


def test_a_cancel_for_an_unknown_or_finished_run_is_ignored():
    with serving() as s, using(RemoteBackend(s.address, s.token)) as b:
        _run_echo(b)  # run 1 (and its ids) finished

        async def stray_cancels() -> None:
            sess = await b._connect()
            for i in (1, 2, 10**9):
                sess.conn.post(Message("cancel", {"id": i}), reply=False)

        b.bridge().call(stray_cancels)
        _run_echo(b)  # the same connection, unharmed
        assert b.server_stats().get("cancelled", 0) == 0


# -- 11: TLS -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem", "other": d / "other.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    with open(paths["cert"], "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    trustme.CA().cert_pem.write_to_path(str(paths["other"]))
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def tls_server(pki):
    with serving("--tls-cert", pki["cert"], "--tls-key", pki["key"]) as s:
        yield s


async def test_tls_client_and_server_give_correct_results(tls_server, pki):
    with using(RemoteBackend(tls_server.address, tls_server.token, tls=pki["ca"])) as b:
        x, big = torch.randn(8, 8), torch.randn(512, 512)  # 1 MiB: streamed, read by receive_some
        graph = genie.trace(lambda x, big: (x @ x.T, torch.tanh(big) * 2), x, big)
        a, c = await genie.execute(graph, x, big)
        torch.testing.assert_close(a, x @ x.T)
        torch.testing.assert_close(c, torch.tanh(big) * 2)
        t = (torch.arange(6.0, device="remote_accelerator:0") * 3).cpu()  # device mode, same link
        torch.testing.assert_close(t, torch.arange(6.0) * 3)
        assert b.stats.bytes_received > big.nbytes  # the result came back through TLS


def test_genie_tls_env_and_connect(tls_server, pki, monkeypatch):
    monkeypatch.setenv("GENIE_SERVER", tls_server.address)
    monkeypatch.setenv("GENIE_TOKEN", tls_server.token)
    monkeypatch.setenv("GENIE_TLS", pki["ca"])
    with using(backend_from_env()) as b:
        _run_echo(b)
    old = genie.runtime.backend()
    try:
        b = genie.connect(tls_server.address, tls_server.token)  # tls= from $GENIE_TLS
        _run_echo(b)
    finally:
        genie.runtime.set_backend(old)
        b.close()


def test_a_plain_client_against_a_tls_server_fails_clearly(tls_server):
    with _deadline(20), pytest.raises((ConnectionLostError, RemoteProtocolError), match="tls=") as err:
        RemoteBackend(tls_server.address, tls_server.token).connect()
    assert "timed out" not in str(err.value)
    _still_serves(tls_server)


def test_a_tls_client_against_a_plain_server_fails_clearly(pki):
    with serving() as s, pytest.raises(ConnectionLostError, match="TLS") as err:
        RemoteBackend(s.address, s.token, tls=pki["ca"]).connect()
    assert "timed out" not in str(err.value)


def test_a_tls_client_with_the_wrong_ca_fails_clearly(tls_server, pki):
    with pytest.raises(ConnectionLostError, match="certificate") as err:
        RemoteBackend(tls_server.address, tls_server.token, tls=pki["other"]).connect()
    assert "verif" in str(err.value)
    _still_serves(tls_server)


def test_bad_tls_settings_are_refused_before_listening(tmp_path, pki):
    cmd, env = _serve_cmd("--host", "127.0.0.1", "--tls-cert", pki["cert"])
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    assert done.returncode == 2 and b"--tls-key" in done.stderr, done
    cmd, env = _serve_cmd("--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", pki["key"])
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    assert done.returncode == 2 and b"cannot load the TLS certificate" in done.stderr, done
    with pytest.raises(ValueError, match="CA bundle"):
        RemoteBackend("127.0.0.1:1", tls=str(tmp_path / "nope.pem"))


def _still_serves(s: fx.ServerProcess) -> None:
    assert s.proc is not None and s.proc.poll() is None


class _deadline:
    """Fail (rather than hang) if the block takes longer than ``seconds``: a SIGALRM in this thread."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def boom(*_: object) -> None:
            raise AssertionError(f"hung for {self.seconds} s")

        self.old = signal.signal(signal.SIGALRM, boom)
        signal.alarm(self.seconds)

    def __exit__(self, *exc: object) -> None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


# -- the wire vocabulary: error kinds live in transport/ only ----------------------------------------
@pytest.mark.parametrize("exc, typ", [
    (RemoteExecutionError("shapes", op="aten.mm.default", remote_traceback="tb"), RemoteExecutionError),
    (ValueError("boom"), RemoteExecutionError),
    (UnsupportedOpError("aten.from_file.default", "reads files"), UnsupportedOpError),
    (RemoteMemoryError("too big"), RemoteMemoryError),
    (MissingOnServerError(["d1", "d2"], "plankey"), MissingOnServerError),
    (RunCancelledError("stop"), RunCancelledError),
    (AuthenticationError("bad token"), AuthenticationError),
    (RemoteProtocolError("broken"), RemoteProtocolError),
])
def test_every_error_kind_round_trips_through_the_wire(exc, typ):
    server, client = _greeted()
    client.receive_data(server.send_bytes(error_message(7, exc)))
    msg = client.next_event()
    got = error_from_message(msg)
    assert type(got) is typ and msg["id"] == 7
    if isinstance(exc, RemoteExecutionError):
        assert (got.op, got.remote_traceback, got.remote_message) == ("aten.mm.default", "tb", "shapes")
    if isinstance(exc, UnsupportedOpError):
        assert got.op == "aten.from_file.default"
    if isinstance(exc, MissingOnServerError):
        assert (got.digests, got.schedule) == (["d1", "d2"], "plankey")
    if isinstance(exc, ValueError):
        assert "ValueError: boom" in str(got) and "ValueError" in got.remote_traceback


def test_error_kinds_are_one_table():
    kinds = {k for _, k in ERROR_KINDS}
    assert kinds == {"missing", "memory", "unsupported", "weights", "cancelled", "auth", "protocol",
                     "execution"}
    for exc in (genie.WeightsError("w"), MemoryError("m"), genie.RemoteMemoryError("r")):  # round trip
        assert type(error_from_message(error_message(1, exc))) is (
            genie.RemoteMemoryError if isinstance(exc, MemoryError) else type(exc))
    assert ERROR_KINDS[-1] == (Exception, "execution")  # the catch-all comes last
    bad = error_from_message(Message("error", {"id": 1, "kind": "surprise", "message": "?"}))
    assert isinstance(bad, ProtocolError) and "surprise" in str(bad)


def _greeted() -> tuple[Protocol, Protocol]:
    server, client = Protocol(SERVER), Protocol(CLIENT)
    server.receive_data(client.send_bytes(Message("hello", {"version": VERSION, "token": ""})))
    server.next_event()
    client.receive_data(server.send_bytes(Message("welcome", {"version": VERSION, "device": "cpu",
                                                              "max_frame": 1 << 20})))
    client.next_event()
    return server, client

