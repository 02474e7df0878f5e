"""The client never sends its token in cleartext to another machine unless told the network is
trusted: with a token, no TLS and an address that is not loopback, ``genie.connect`` (and any
backend) refuses before a byte goes out, naming the fixes."""

from __future__ import annotations

import socket

import pytest
from _server_fixtures import check_served, serving, using

import genie
from genie.runtime._remote import RemoteBackend


def own_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one (no packet is sent)."""
    for probe in ("192.0.2.1", "10.255.255.255", "8.8.8.8"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect((probe, 9))
            addr = s.getsockname()[0]
        except OSError:
            continue
        finally:
            s.close()
        if not addr.startswith("127."):
            return addr
    return None


@pytest.mark.parametrize("address", ["192.0.2.10:7070", "[2001:db8::1]:7070"])
def test_a_token_is_never_sent_in_cleartext_to_another_machine(address, monkeypatch):
    monkeypatch.delenv("GENIE_TLS", raising=False)
    monkeypatch.delenv("GENIE_INSECURE", raising=False)
    with pytest.raises(genie.CleartextTokenError) as e:
        genie.connect(address, token="secret")
    text = str(e.value)
    assert "cleartext" in text and "tls=True" in text and "GENIE_TLS" in text
    assert "insecure=True" in text and "GENIE_INSECURE=1" in text
    assert isinstance(e.value, ValueError)  # the caller's configuration


def test_loopback_or_no_token_is_not_refused(monkeypatch):
    monkeypatch.delenv("GENIE_INSECURE", raising=False)
    with serving() as srv:
        with using(RemoteBackend(srv.address, srv.token)) as b:  # 127.0.0.1 with a token
            check_served(b)
        with using(RemoteBackend(f"localhost:{srv.port}", srv.token)) as b:
            check_served(b)


def test_insecure_or_its_environment_variable_allow_a_trusted_network(monkeypatch):
    addr = own_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback address to serve on")
    with serving("--host", "0.0.0.0") as srv:  # a token is set: the server may listen there
        target = f"{addr}:{srv.port}"
        monkeypatch.delenv("GENIE_INSECURE", raising=False)
        refused = RemoteBackend(target, srv.token)
        try:
            with pytest.raises(genie.CleartextTokenError):
                refused.connect()
        finally:
            refused.close()
        with using(RemoteBackend(target, srv.token, insecure=True)) as b:
            check_served(b)
        monkeypatch.setenv("GENIE_INSECURE", "1")
        with using(RemoteBackend(target, srv.token)) as b:
            check_served(b)
