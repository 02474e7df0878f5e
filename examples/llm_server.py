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

How Genie is used (docs/serving.md has the rules this follows):

- The model is moved to ``remote_accelerator:0`` once: its weights live on the Genie server
  (``GENIE_SERVER=host:port``, or one this process starts itself).
- A request is two ``genie.compile``'d steps, ``prefill`` and ``decode``, each returning the next
  token. Each is awaited through ``genie.call``: a step recorded before replays at once as one
  frame; a new one records on a worker thread while the event loop serves other requests.
- Each request owns a ``StaticCache`` that stays on the Genie server. Only the chosen token comes
  back, through ``await genie.fetch(...)``, which never blocks the event loop either.
- Shapes repeat, so steps replay: the cache length is rounded up to ``BUCKET`` and the prompt is
  right-padded to a multiple of ``PROMPT_BUCKET``, so a prompt of any length shares its bucket's
  recording.
- ``Generator.warmup`` uploads the weights and records the common buckets before the first
  request; then the startup heap is frozen (``freeze_startup_heap``), so that no garbage
  collection of it stalls the loop.

``Generator.stream`` is the whole inference path; ``bench/serve_loop.py`` drives it without HTTP and
blames any stall of the event loop on the phase named by ``PHASE``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import contextvars
import gc
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import anyio  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import genie  # noqa: E402

DEV = "remote_accelerator:0"
SEED = 0
BUCKET = 32  # cache lengths are rounded up to this: requests of similar sizes share one recording
PROMPT_BUCKET = 8  # prompts are right-padded to a multiple of this: one prefill recording per bucket
MAX_BODY = 1 << 16  # bytes of JSON a request may send
# what the current request is doing; bench/serve_loop.py names the phase in which the event loop stalled
PHASE: contextvars.ContextVar[str] = contextvars.ContextVar("llm_server_phase", default="")


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


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


# -- the two steps of a request: genie.compile'd once per Generator, plain PyTorch on the CPU --------
@torch.no_grad()  # no_grad inside the step: grad mode is per thread, and steps may record on another
def prefill(model: nn.Module, ids: torch.Tensor, cache, last: torch.Tensor) -> torch.Tensor:
    """The prompt, right-padded to a bucket, through ``model`` into ``cache``: the next token, (1, 1).

    ``ids`` (1, P) and ``last`` (1,), the prompt's last position, are host tensors: they travel by
    their bytes, so every prompt length of a bucket replays one recording. The padding after the
    prompt never reaches its tokens (attention is causal), and each cache layer's write position is
    set back to the prompt's end, so the decode steps overwrite the padding."""
    dev = model.device
    ids, last = ids.to(dev), last.to(dev)
    # transformers reads a StaticCache's position on the host to pick a prefill's causal mask
    # (``q_offset == 0``): a sync inside the step, which could not replay. This cache is empty.
    cache.get_query_offset = lambda layer_idx=0: 0
    try:
        out = model(ids, cache=cache, use_cache=True)
    finally:
        del cache.get_query_offset
    for layer in cache.layers:
        layer.cumulative_length.copy_(last[0] + 1)
    return out.logits.index_select(1, last).argmax(-1)


@torch.no_grad()
def decode(model: nn.Module, tok: torch.Tensor, cache) -> torch.Tensor:
    """One token (1, 1) through ``model`` at the cache's position (which it advances): the next one.
    The cache holds its position as a tensor, so every step has the same shapes and replays."""
    out = model(tok, cache=cache, use_cache=True)
    return out.logits[:, -1:].argmax(-1)


class Generator:
    """One model, shared by every request; each request gets its own KV cache.

    ``device="cpu"`` runs the same code as plain eager PyTorch (``bench/serve_loop.py`` compares the two).
    Steps are awaited through ``genie.call``, which records on a worker thread on the calling
    thread's behalf, so the event loop never waits for a recording."""

    def __init__(self, model: nn.Module, device: str = DEV) -> None:
        self.device = device
        self.model = model.requires_grad_(False).to(device)
        remote = device != "cpu"
        self.prefill = genie.compile(prefill) if remote else prefill
        self.decode = genie.compile(decode) if remote else decode
        cfg = self.model.config
        self.vocab = cfg.vocab_size
        self.max_positions = getattr(cfg, "n_positions", None) or cfg.max_position_embeddings
        self.heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

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

    def new_cache(self, length: int):
        """A ``StaticCache`` for ``length`` positions, rounded up to ``BUCKET``, its tensors made now:
        a prefill that allocated them would leave new tensors in the cache, which cannot replay."""
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config,
                            max_cache_len=min(_round_up(length, BUCKET), self.max_positions))
        cache.early_initialization(batch_size=1, num_heads=self.heads, head_dim=self.head_dim,
                                   dtype=self.model.dtype, device=torch.device(self.device))
        for layer in cache.layers:  # made on the device, not uploaded: a recording cannot tell apart
            layer.cumulative_length = torch.zeros_like(layer.cumulative_length)  # equal uploaded bytes
        return cache

    async def _call(self, fn, *args):
        """``fn(*args)`` without blocking the event loop on Genie: ``genie.call``. Eager runs it here
        (the CPU computing is the wait), then lets other requests run."""
        if self.device != "cpu":
            return await genie.call(fn, *args)
        out = fn(*args)
        await anyio.lowlevel.checkpoint()
        return out

    async def stream(self, prompt_ids: list[int], max_new_tokens: int) -> AsyncIterator[int]:
        """Greedy decoding: yields each new token id as soon as it is known."""
        n = len(prompt_ids)
        PHASE.set("new request")
        cache = await self._call(self.new_cache, n + max_new_tokens)
        padded = min(_round_up(n, PROMPT_BUCKET), cache.get_max_length())
        PHASE.set("prefill")
        tok = await self._call(self.prefill, self.model, torch.tensor([prompt_ids + [0] * (padded - n)]),
                               cache, torch.tensor([n - 1]))
        for i in range(max_new_tokens):
            PHASE.set("fetch")
            yield int(await _fetch(tok))
            if i + 1 < max_new_tokens:
                PHASE.set("decode")
                tok = await self._call(self.decode, self.model, tok, cache)

    async def warmup(self, prompts: tuple[int, ...] = (PROMPT_BUCKET, 2 * PROMPT_BUCKET),
                     lengths: tuple[int, ...] = (BUCKET, 2 * BUCKET)) -> None:
        """Upload the weights and record the prefill of each prompt bucket in ``prompts`` into a
        cache of each length in ``lengths``, and the decode step of each, before the first request.
        Any other bucket records on first use, on a worker thread: later, but never blocking the
        event loop."""
        for length in lengths:
            for n in prompts:
                if n < min(length, self.max_positions):
                    tokens = self.stream([1] * n, min(length, self.max_positions) - n)
                    async with contextlib.aclosing(tokens):
                        async for _ in tokens:  # the prefill's token, then one decode step's
                            break
                        async for _ in tokens:
                            break


async def _fetch(t: torch.Tensor) -> torch.Tensor:
    """The value of remote ``t`` on the CPU, awaited: the event loop keeps serving other requests."""
    if t.device.type == "cpu":
        return t
    (v,) = await genie.fetch(t)
    return v


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
    _run_until_done(args.loop, gen.warmup)  # the weights up, the common steps recorded
    freeze_startup_heap()
    app = create_app(gen)
    sock = socket.create_server((args.host, args.port))
    host, port = sock.getsockname()[:2]
    print(f"llm_server listening on http://{host}:{port}", flush=True)
    serve = _serve_trio if args.loop == "trio" else _serve_asyncio
    _run_until_done(args.loop, lambda: serve(app, sock))
    return 0


def freeze_startup_heap() -> None:
    """Move everything made so far (torch, transformers, the model, Genie's recordings: some 380,000
    objects) out of the garbage collector's sight. A full collection of them holds the GIL for about
    200 ms, whichever thread runs it, and so stalls the event loop; frozen, it takes about 2 ms.
    (Unfrozen at exit, so that the interpreter's last collection still finds them.)"""
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)


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
