"""``genie serve`` from the command line, and the embedded default server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from genie.cli import build_parser, parse_size


def test_parse_size():
    assert parse_size("1000") == 1000
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("20GB") == 20 << 30
    assert parse_size("64k") == 64 << 10
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")


def test_serve_arguments():
    args = build_parser().parse_args(["serve", "--port", "0", "--device", "cpu", "--token", "t",
                                      "--memory-limit", "2GiB"])
    assert (args.port, args.device, args.token, args.memory_limit) == (0, "cpu", "t", 2 << 30)
    assert args.host == "127.0.0.1"


def test_bad_device_is_refused():
    out = subprocess.run([sys.executable, "-m", "genie", "serve", "--device", "tpu:0", "--port", "0"],
                         capture_output=True, timeout=60)
    assert out.returncode == 2 and b"--device" in out.stderr


EMBEDDED = textwrap.dedent("""
    import json, torch, genie
    from genie.runtime import backend
    x = torch.arange(6.0).reshape(2, 3).to("remote_accelerator:0")
    y = (x * 2 + 1).sum().item()
    b = backend()
    print(json.dumps({"y": y, "pids": [b._embedded.proc.pid, b.server_stats()["pid"]],
                      "connections": genie.stats()["connections"]}))
""")


def test_embedded_server_starts_on_first_use_and_stops_at_exit():
    env = {k: v for k, v in os.environ.items() if k not in ("GENIE_SERVER", "GENIE_TOKEN")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", EMBEDDED], env=env, capture_output=True, timeout=120,
                         check=True)
    result = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert result["y"] == 36.0 and result["connections"] == 1
    front, worker = result["pids"]
    assert front != worker  # the program ran in the tenant's worker process
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if not any(_alive(pid) for pid in (front, worker)):
            return
        time.sleep(0.1)
    pytest.fail("the embedded genie server (or its worker) outlived its parent")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_inprocess_debug_backend():
    env = {**os.environ, "GENIE_SERVER": "inprocess", "OMP_NUM_THREADS": "1"}
    code = ("import torch, genie; from genie.runtime import backend; "
            "print(type(backend()).__name__, (torch.ones(3).to('remote_accelerator:0') + 1).sum().item())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120, check=True)
    assert out.stdout.decode().split() == ["LocalBackend", "6.0"]
