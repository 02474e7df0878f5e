"""The server-to-server transfer's trust rules, against real ``genie serve`` processes.

A transfer token reads only the one value it names, once; a server pulls only from the peers in its
own allowlist (no SSRF); a pulled value is bounded by the receiver's limits; a bad token is the
client's fault and loses nothing; a transfer connection can do nothing else.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import _server_fixtures as fx
import pytest
import torch
from _server_fixtures import Message, Protocol, ServerProcess, check_served, reply, using
from test_multi_server import server_pair, server_set

import genie
from genie.graph import RESIDENT
from genie.runtime import RemoteBackend, ServerSet
from genie.transport import VERSION

server = fx.server  # a fixture, by name
torch.set_num_threads(1)
D0 = "remote_accelerator:0"


@pytest.fixture(scope="module")
def pair() -> Iterator[list[ServerProcess]]:
    with server_pair("--memory-limit", "64MiB") as servers:
        yield servers


@pytest.fixture
def two(pair: list[ServerProcess]) -> Iterator[ServerSet]:
    with using(server_set(pair)) as b:
        yield b


def kept_on_0(values: list[float]) -> tuple[torch.Tensor, int]:
    """A value kept on server 0, and its handle."""
    x = torch.tensor(values, device=D0) * 1
    x.cpu()  # runs; x is now a resident value under a handle
    assert x._node.op == RESIDENT
    return x, x._node.args[0]


def pull(b: RemoteBackend, peer: str, token: str, shape: list[int]) -> torch.Tensor:
    """Pull one float32 value lent under ``token`` into ``b``'s server, and read it back (a pull
    returns at once; its failure is raised where the value is read)."""
    (name,) = b.pull(peer, token, [("float32", shape)])
    (got,) = b.bridge().call(b._fetch, [name])
    return got


def test_a_token_reads_its_one_value_once(two, pair):
    _, h = kept_on_0([1.0, 2.0, 3.0])
    token, nbytes = two.backends[0].lend([h])
    assert nbytes == 12
    assert pull(two.backends[1], pair[0].address, token, [3]).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(genie.AuthenticationError, match="bad or already used transfer token"):
        pull(two.backends[1], pair[0].address, token, [3])  # spent
    for b in two.backends:  # nobody lost their connection
        check_served(b)


def test_a_forged_token_is_refused_and_loses_nothing(two, pair):
    _, h = kept_on_0([4.0, 5.0])
    token, _ = two.backends[0].lend([h])
    forged = token[:-4] + ("0000" if not token.endswith("0000") else "1111")
    with pytest.raises(genie.AuthenticationError, match="transfer token"):
        pull(two.backends[1], pair[0].address, forged, [2])
    with pytest.raises(genie.AuthenticationError):  # a client's own token is no transfer token
        pull(two.backends[1], pair[0].address, pair[0].token, [2])
    assert pull(two.backends[1], pair[0].address, token, [2]).tolist() == [4.0, 5.0]  # still works


def test_a_server_pulls_only_from_its_allowlist(two, pair):
    """SSRF: an address the client chose and the server did not allow is never connected to."""
    _, h = kept_on_0([1.0])
    token, _ = two.backends[0].lend([h])
    with socket.socket() as bait:  # a service on loopback the client would like the server to reach
        bait.bind(("127.0.0.1", 0))
        bait.listen(1)
        bait.setblocking(False)
        port = bait.getsockname()[1]
        with pytest.raises(genie.AuthenticationError, match="allowlist"):
            pull(two.backends[1], f"127.0.0.1:{port}", token, [1])
        with pytest.raises(genie.AuthenticationError, match="allowlist"):
            pull(two.backends[1], f"localhost:{pair[0].port}", token, [1])  # not as listed
        two.backends[1].server_stats()  # a round trip after the refusals: they are all answered
        with pytest.raises(BlockingIOError):
            bait.accept()  # nobody connected
    check_served(two.backends[1])


def test_a_server_without_peers_pulls_from_nobody(server, pair):
    with using(server_set(pair)) as two:
        _, h = kept_on_0([1.0])
        token, _ = two.backends[0].lend([h])
    with using(RemoteBackend(server.address, server.token)) as b:
        with pytest.raises(genie.AuthenticationError, match="allowlist.*empty"):
            pull(b, pair[0].address, token, [1])
        check_served(b)


def test_a_pull_is_bounded_by_the_receivers_limits(two, pair):
    _, h = kept_on_0([1.0, 2.0])
    token, _ = two.backends[0].lend([h])
    with pytest.raises(genie.RemoteMemoryError, match="memory-limit"):  # declared past the limit
        pull(two.backends[1], pair[0].address, token, [64 << 20])
    with pytest.raises(genie.GenieError, match="client declared"):  # declared smaller than it is
        pull(two.backends[1], pair[0].address, token, [1])
    check_served(two.backends[1])


def test_a_transfer_connection_claims_one_value_and_nothing_else(two, pair):
    _, h = kept_on_0([7.0, 8.0])
    token, _ = two.backends[0].lend([h])
    s = socket.create_connection(("127.0.0.1", pair[0].port), timeout=10)
    p = Protocol("client")
    s.sendall(p.send_bytes(Message("hello", {"version": VERSION, "token": token})))
    assert reply(s, p).kind == "welcome"
    value = reply(s, p)
    assert value.kind == "value" and value.buffers[0].tolist() == [7.0, 8.0]
    try:  # anything more: the server has closed it
        s.sendall(p.send_bytes(Message("stats", {"id": 1})))
        s.settimeout(10)
        assert s.recv(1 << 16) == b""
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        s.close()
    check_served(two.backends[0])


def test_a_token_is_scoped_to_the_tenant_that_lent(tmp_path):
    """On a server with two tenants, a lend's secret presented under the other tenant's name reads
    nothing: each tenant's worker holds its own lends."""
    from genie.transport import free_ports

    tokens = tmp_path / "tokens"
    tokens.write_text("alpha:tok-a\nbeta:tok-b\n")
    receiver_port, lender_port = free_ports(2)
    with fx.serving("--tokens", str(tokens), port=lender_port) as lender, \
            fx.serving("--peers", f"127.0.0.1:{lender_port}", port=receiver_port) as receiver:
        beta = RemoteBackend(lender.address, "tok-b")
        beta.connect()  # beta's worker runs too
        with using(RemoteBackend(lender.address, "tok-a")) as alpha:
            kept = torch.tensor([3.0, 4.0], device=D0) * 1
            kept.sum().item()
            token, _ = alpha.lend([kept._node.args[0]])
            assert token.startswith("genie-transfer.alpha.")
            as_beta = token.replace(".alpha.", ".beta.")
            with using(RemoteBackend(receiver.address, receiver.token)) as b:
                with pytest.raises(genie.AuthenticationError, match="bad or already used"):
                    pull(b, lender.address, as_beta, [2])
                assert pull(b, lender.address, token, [2]).tolist() == [3.0, 4.0]
        beta.close()
