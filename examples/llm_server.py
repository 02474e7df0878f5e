"""An async HTTP inference server on Genie: greedy generation, tokens streamed as server-sent events.

    python examples/llm_server.py --model gpt2 --loop trio --port 8000      # hypercorn on trio
    python examples/llm_server.py --model llama --loop asyncio --port 0     # uvicorn on asyncio

    curl -N -X POST localhost:8000/generate -d '{"prompt_ids": [5, 7, 9], "max_new_tokens": 8}'
    data: {"token": 78}
    ...
    data: [DONE]

Token ids in, token ids out (no tokenizer: nothing is downloaded). The weights are random but seeded
(``build_model``), so a client can rebuild the same model and check the tokens. ``"stream": false``
returns ``{"tokens": [...]}`` in one JSON body instead.

How Genie is used: the model is moved to ``remote_accelerator:0`` once (its weights live on the Genie
server: ``GENIE_SERVER=host:port``, or one this process starts itself), and its ``forward`` goes
through ``genie.compile``, so a decode step is one replayed frame rather than hundreds of recorded
ops. Each request owns a ``StaticCache`` that stays on the Genie server; only the chosen token comes
back, through ``await genie.fetch(...)``, which never blocks the event loop. Every decode step of
every request has the same shapes (the cache length is rounded up to a bucket), so all requests
replay the same recording.

``Generator.stream`` is the whole inference path; ``bench/serve.py`` drives it without HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import genie  # noqa: E402

DEV = "remote_accelerator:0"
SEED = 0
BUCKET = 32  # cache lengths are rounded up to this: requests of similar sizes share one recording
MAX_BODY = 1 << 16  # bytes of JSON a request may send


# -- the model --------------------------------------------------------------------------------------
def build_model(name: str, size: str = "tiny") -> nn.Module:
    """A small real architecture with seeded random weights, on the CPU, in eval mode.

    ``initializer_range=0.2`` spreads the logits, so greedy choices are far from ties and a remote
    run's float rounding cannot flip a token."""
    tiny = size == "tiny"
    torch.manual_seed(SEED)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=2 if tiny else 4, n_embd=64 if tiny else 256, n_head=4,
                         vocab_size=128 if tiny else 4096, n_positions=128 if tiny else 256,
                         bos_token_id=0, eos_token_id=0, initializer_range=0.2)
        return GPT2LMHeadModel(cfg).eval()
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=128 if tiny else 4096, hidden_size=64 if tiny else 256,
                          intermediate_size=128 if tiny else 704, num_hidden_layers=2 if tiny else 4,
                          num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=128 if tiny else 256,
                          initializer_range=0.2, bos_token_id=1, eos_token_id=None)
        return LlamaForCausalLM(cfg).eval()
    raise ValueError(f"unknown model {name!r}: expected 'gpt2' or 'llama'")


class BadRequest(ValueError):
    """The HTTP client's fault: a malformed or out-of-range request (answered with status 400)."""


async def _fetch(t: torch.Tensor) -> torch.Tensor:
    """The value of remote ``t`` on the CPU, awaited: the event loop keeps serving other requests."""
    if t.device.type == "cpu":  # eager: still let other requests run between tokens
        import anyio

        await anyio.lowlevel.checkpoint()
        return t
    (v,) = await genie.fetch(t)
    return v


class Generator:
    """One model, shared by every request; each request gets its own KV cache.

    ``device="cpu"`` runs the same code as plain eager PyTorch (``bench/serve.py`` compares the two).
    Call it from the thread that built it: Genie records each thread's ops apart, and the weights
    belong to this one's."""

    def __init__(self, model: nn.Module, device: str = DEV) -> None:
        self.device = device
        self.model = model.requires_grad_(False).to(device)
        if device != "cpu":
            self.model.forward = genie.compile(self.model.forward)
        cfg = self.model.config
        self.vocab = cfg.vocab_size
        self.max_positions = getattr(cfg, "n_positions", None) or cfg.max_position_embeddings

    def check(self, prompt_ids: Any, max_new_tokens: Any) -> tuple[list[int], int]:
        """The request's arguments, validated; ``BadRequest`` names what is wrong."""
        if not isinstance(prompt_ids, list) or not prompt_ids or \
                not all(type(t) is int and 0 <= t < self.vocab for t in prompt_ids):
            raise BadRequest(f"prompt_ids must be a non-empty list of token ids in [0, {self.vocab})")
        if type(max_new_tokens) is not int or max_new_tokens < 1:
            raise BadRequest("max_new_tokens must be a positive integer")
        if len(prompt_ids) + max_new_tokens > self.max_positions:
            raise BadRequest(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's {self.max_positions} positions")
        return prompt_ids, max_new_tokens

    def _cache(self, length: int):
        from transformers import StaticCache

        return StaticCache(config=self.model.config,
                           max_cache_len=min(-(-length // BUCKET) * BUCKET, self.max_positions))

    def _forward(self, ids: torch.Tensor, cache, start: int):
        # no_grad around each call, never across an ``await``: grad mode is per thread, and other
        # requests' steps run on this thread between this one's
        with torch.no_grad():
            return self.model(ids, cache=cache, use_cache=True,
                              cache_position=torch.arange(start, start + ids.shape[1]).to(self.device))

    async def stream(self, prompt_ids: list[int], max_new_tokens: int) -> AsyncIterator[int]:
        """Greedy decoding: yields each new token id as soon as it is known."""
        n = len(prompt_ids)
        cache = self._cache(n + max_new_tokens)
        out = self._forward(torch.tensor([prompt_ids]).to(self.device), cache, 0)
        for i in range(max_new_tokens):
            # (1, 1) already: the next step's input_ids, resident once fetched, with no view to run
            with torch.no_grad():
                tok = out.logits[:, -1:].argmax(-1)
            yield int(await _fetch(tok))
            if i + 1 < max_new_tokens:
                out = self._forward(tok, cache, n + i)


# -- HTTP -------------------------------------------------------------------------------------------
def create_app(gen: Generator):
    """``POST /generate`` (server-sent events, or one JSON body with ``"stream": false``), ``GET /health``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def generate(request: Request):
        try:
            body = await request.body()
            if len(body) > MAX_BODY:
                raise BadRequest(f"request body over {MAX_BODY} bytes")
            try:
                req = json.loads(body)
            except ValueError as e:
                raise BadRequest(f"request body is not JSON: {e}") from None
            if not isinstance(req, dict):
                raise BadRequest("request body must be a JSON object")
            prompt, n = gen.check(req.get("prompt_ids"), req.get("max_new_tokens", 16))
            stream = req.get("stream", True)
            if type(stream) is not bool:
                raise BadRequest("stream must be true or false")
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        if not stream:
            try:
                return JSONResponse({"tokens": [t async for t in gen.stream(prompt, n)]})
            except genie.GenieError as e:  # the Genie server's fault, or the network's: not the client's
                return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=502)
        return StreamingResponse(_events(gen.stream(prompt, n)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def health(request: Request):
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/generate", generate, methods=["POST"]),
                             Route("/health", health, methods=["GET"])])


async def _events(tokens: AsyncIterator[int]) -> AsyncIterator[bytes]:
    try:
        async for t in tokens:
            yield b'data: {"token": %d}\n\n' % t
    except genie.GenieError as e:  # the Genie server failed mid-stream: say so in the stream
        yield b"event: error\ndata: %s\n\n" % json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
        return
    yield b"data: [DONE]\n\n"


# -- serving ----------------------------------------------------------------------------------------
async def _serve_trio(app, sock: socket.socket) -> None:
    import signal

    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    async def stop() -> None:  # SIGINT/SIGTERM: finish in-flight requests, then return
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return

    cfg = Config()
    cfg.bind = [f"fd://{sock.fileno()}"]
    cfg.accesslog = None
    await serve(app, cfg, shutdown_trigger=stop)


async def _serve_asyncio(app, sock: socket.socket) -> None:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    await server.serve(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (the URL is printed)")
    parser.add_argument("--loop", choices=("trio", "asyncio"), default="trio",
                        help="trio serves with hypercorn, asyncio with uvicorn")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    gen = Generator(build_model(args.model, args.size))
    # uploads the weights and records the decode step before the first request, not during it
    warm_ids = [1, 2, 3]
    _run_until_done(args.loop, lambda: _drain(gen.stream(warm_ids, 3)))
    app = create_app(gen)
    sock = socket.create_server((args.host, args.port))
    host, port = sock.getsockname()[:2]
    print(f"llm_server listening on http://{host}:{port}", flush=True)
    serve = _serve_trio if args.loop == "trio" else _serve_asyncio
    _run_until_done(args.loop, lambda: serve(app, sock))
    return 0


async def _drain(tokens: AsyncIterator[int]) -> None:
    async for _ in tokens:
        pass


def _run_until_done(loop: str, afn) -> None:
    """``afn()`` on a new event loop of kind ``loop``, on this thread (the one that owns the model)."""
    if loop == "trio":
        import trio

        trio.run(afn)
    else:
        import asyncio

        asyncio.run(afn())


if __name__ == "__main__":
    sys.exit(main())
