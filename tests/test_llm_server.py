"""examples/llm_server.py as its users run it: a subprocess serving HTTP, 8 concurrent streams.

Each stream's tokens must equal greedy decoding of the same seeded model in this process, on the
CPU, with plain transformers (no cache: the whole sequence again for each token).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest
import trio
from _models import LLM_SERVER_EXAMPLE, greedy, llm_server_example
from _server_fixtures import ServerProcess, server  # noqa: F401

from genie.runtime import RemoteBackend

PROMPTS = [([5, 7, 9, 11], 12), ([1], 5), ([3, 3, 3], 20), ([100, 2, 64, 17, 8, 99], 9),
           ([42] * 10, 16), ([7, 8], 1), ([120, 0, 1, 2, 3], 24), ([66, 77, 88], 7)]


class Example:
    """One ``python examples/llm_server.py`` child; its URL is read from its first line of stdout."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, str(LLM_SERVER_EXAMPLE), "--port", "0", *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._err = bytearray()
        threading.Thread(target=self._drain, daemon=True).start()
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)
        if not line or not line[0].startswith(b"llm_server listening on "):
            self.close()
            raise RuntimeError(f"llm_server did not start: {self.stderr()}")
        self.url = line[0].split()[-1].decode()

    def _drain(self) -> None:
        while chunk := self.proc.stderr.read1(1 << 16):
            self._err += chunk
            del self._err[: max(0, len(self._err) - (64 << 10))]

    def stderr(self) -> str:
        return self._err.decode(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


# (model, loop, genie server): both loops; the shared ``genie serve`` and the embedded default
CASES = [("gpt2", "trio", "shared"), ("gpt2", "asyncio", "embedded"), ("llama", "asyncio", "shared")]


@pytest.fixture(params=CASES, ids=["-".join(c) for c in CASES])
def example(request) -> Iterator[tuple[Example, str, ServerProcess | None]]:
    model, loop, where = request.param
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GENIE_SERVER", None)
    s: ServerProcess | None = None
    if where == "shared":
        s = request.getfixturevalue("server")
        env["GENIE_SERVER"], env["GENIE_TOKEN"] = s.address, s.token
    ex = Example("--model", model, "--loop", loop, env=env)
    try:
        yield ex, model, s
    finally:
        ex.close()


async def _stream(client: httpx.AsyncClient, url: str, prompt: list[int], n: int) -> list[int]:
    """The tokens of one SSE stream; fails on anything but token events and one final [DONE]."""
    tokens: list[int] = []
    done = False
    req = {"prompt_ids": prompt, "max_new_tokens": n}
    async with client.stream("POST", f"{url}/generate", json=req) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if not line:
                continue
            assert not done, f"event after [DONE]: {line!r}"
            assert line.startswith("data: "), f"not a data event: {line!r}"
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
            else:
                tokens.append(json.loads(data)["token"])
    assert done, "stream ended without [DONE]"
    return tokens


async def test_concurrent_streams_equal_eager(example) -> None:
    ex, model_name, genie_server = example
    model = llm_server_example().build_model(model_name)
    want = [greedy(model, p, n) for p, n in PROMPTS]
    got: list[list[int] | None] = [None] * len(PROMPTS)
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(i: int) -> None:
            got[i] = await _stream(client, ex.url, *PROMPTS[i])

        try:
            async with trio.open_nursery() as nursery:
                for i in range(len(PROMPTS)):
                    nursery.start_soon(one, i)
        except BaseException:
            print(ex.stderr())
            raise
        for i, ((p, n), w, g) in enumerate(zip(PROMPTS, want, got, strict=True)):
            assert len(g) == n, (i, g)
            assert g == w, f"request {i} (prompt {p}): served {g}, eager {w}"

        # the JSON mode gives the same tokens; a bad request is the client's fault, named
        r = await client.post(f"{ex.url}/generate", json={"prompt_ids": PROMPTS[0][0], "max_new_tokens": 4,
                                                          "stream": False})
        assert r.status_code == 200 and r.json() == {"tokens": want[0][:4]}
        for bad, why in (({"prompt_ids": [999], "max_new_tokens": 2}, "token ids in [0, 128)"),
                         ({"prompt_ids": [1], "max_new_tokens": 1000}, "exceeds the model's 128 positions"),
                         ({"prompt_ids": "abc"}, "non-empty list")):
            r = await client.post(f"{ex.url}/generate", json=bad)
            assert r.status_code == 400 and why in r.json()["error"], r.text
        r = await client.post(f"{ex.url}/generate", content=b"{not json")
        assert r.status_code == 400 and "not JSON" in r.json()["error"]
    if genie_server is not None:  # the example's concurrent decode steps were taken as one batch
        b = RemoteBackend(genie_server.address, genie_server.token)
        try:
            assert (await trio.to_thread.run_sync(b.server_stats))["batch_ready_max"] >= 2
        finally:
            b.close()
