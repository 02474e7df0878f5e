"""More than one server: a two-stage pipeline pooled over two ``genie serve``s against one server, and
the server-to-server transfer against raw loopback sockets.

    python bench/pool.py                    # pipeline table, then transfers at 1, 16, 64 MiB
    python bench/pool.py --sizes 64 --reps 3

Pipeline: a GPT-2 (random weights) split by an accelerate ``device_map``: embeddings and the first
half of the blocks on ``remote_accelerator:0``, the rest and the head on ``:1`` ("pooled"), or every
module on ``:0`` ("one server"). Reported per forward (a prompt) and per decode step (one token, a
DynamicCache, the next token's id fetched): best-of milliseconds, and the bytes this client sent and
received (``genie.stats()``). Targets: a decode step pooled costs the client <= 1 KiB more than on
one server; a 2 MiB stage hand-off costs the client <= 64 KiB (tests/test_multi_server.py).

Transfer: a value kept on server 0 moved to server 1 (``lend`` + ``pull``: the bytes go server to
server), against ``bench/transport.py``'s raw baseline (blocking ``sendall``/``recv_into`` echo),
both as one-way payload GB/s. Target: >= 0.8x raw at 64 MiB.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import torch  # noqa: E402
from _common import report  # noqa: E402
from _server_fixtures import ServerProcess, set_backend  # noqa: E402
from transport import MiB, RawEcho  # noqa: E402

import genie  # noqa: E402
from genie.runtime import RemoteBackend, ServerSet  # noqa: E402
from genie.transport import free_ports  # noqa: E402

D0, D1 = "remote_accelerator:0", "remote_accelerator:1"


@contextlib.contextmanager
def two_servers() -> Iterator[ServerSet]:
    """Two servers allowing each other as peers, and a client of both."""
    token = os.urandom(8).hex()
    ports = free_ports(2)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    servers = [ServerProcess("--peers", addresses[1 - i], token=token, port=p) for i, p in enumerate(ports)]
    b = ServerSet([RemoteBackend(s.address, token, index=i) for i, s in enumerate(servers)])
    set_backend(b)
    try:
        yield b
    finally:
        set_backend(None)
        b.close()
        for s in servers:
            s.close()


def _model(layers: int, width: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=512, n_positions=256,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    return GPT2LMHeadModel(cfg).eval()


def _device_map(layers: int, pooled: bool) -> dict[str, str]:
    second = D1 if pooled else D0
    dm = {"transformer.wte": D0, "transformer.wpe": D0, "transformer.drop": D0,
          "transformer.ln_f": second, "lm_head": second}
    dm.update({f"transformer.h.{i}": D0 if i < layers // 2 else second for i in range(layers)})
    return dm


def _traffic(before: dict) -> int:
    after = genie.stats()
    return after["bytes_sent"] + after["bytes_received"] - before["bytes_sent"] - before["bytes_received"]


SETUPS = {  # name -> (pooled, the logits come back to device 0 as accelerate does by default)
    "one server": (False, True),
    "pooled, logits back on :0": (True, True),
    "pooled, logits stay on :1": (True, False),
}


def pipeline(setup: str, layers: int, width: int, prompt: int, steps: int, reps: int) -> dict:
    import accelerate

    pooled, back = SETUPS[setup]
    ids = torch.randint(0, 512, (1, prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = _model(layers, width)
        want = eager(ids).logits[0, -1].argmax()
    model = accelerate.dispatch_model(_model(layers, width), device_map=_device_map(layers, pooled))
    if not back:  # dispatch_model's top-level hook moves outputs to the inputs' device: one hand-off more
        accelerate.hooks.remove_hook_from_module(model)
    best_fwd = best_step = float("inf")
    fwd_bytes = step_bytes = 0
    with torch.no_grad():
        for _ in range(reps):
            before = genie.stats()
            t0 = time.perf_counter()
            out = model(ids.to(D0), use_cache=True)
            token = out.logits[0, -1].argmax().item()
            best_fwd = min(best_fwd, time.perf_counter() - t0)
            fwd_bytes = _traffic(before)
            assert token == want.item(), "the pipeline's first token differs from eager"
            cache = out.past_key_values
            for _ in range(steps):
                before = genie.stats()
                t0 = time.perf_counter()
                out = model(torch.tensor([[token]]).to(D0), cache=cache, use_cache=True)
                token = out.logits[0, -1].argmax().item()
                best_step = min(best_step, time.perf_counter() - t0)
                step_bytes = _traffic(before)  # the last step's: the steady state
                cache = out.past_key_values
    return {"setup": setup, "forward ms": best_fwd * 1e3,
            "forward client B": fwd_bytes, "decode step ms": best_step * 1e3, "step client B": step_bytes}


def transfer(b: ServerSet, size: int, reps: int, raw: RawEcho) -> dict:
    x = torch.randn(size // 4, device=D0)
    torch.remote_accelerator.synchronize()
    x.sum().item()  # ran: x is kept on server 0
    handle = x._node.args[0]
    meta = x._node.outputs[0]
    best_move = best_raw = float("inf")
    data = memoryview(torch.empty(size, dtype=torch.uint8).numpy())
    for _ in range(reps):
        t0 = time.perf_counter()
        (moved,) = b._move(0, [handle], [meta], 1)
        b.backends[1].synchronize()  # the pull has landed on server 1
        best_move = min(best_move, time.perf_counter() - t0)
        b.backends[1].free(moved)
        best_raw = min(best_raw, raw.echo(data) / 2)  # an echo moves the payload twice
    return {"MiB": size // MiB, "server->server GB/s": size / best_move / 1e9,
            "raw one-way GB/s": size / best_raw / 1e9, "s2s/raw": best_raw / best_move,
            "s2s ms": best_move * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64], help="transfer sizes, MiB")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    with two_servers() as b:
        rows = [pipeline(s, args.layers, args.width, args.prompt, args.steps, args.reps) for s in SETUPS]
        extra = {r["setup"]: r["step client B"] - rows[0]["step client B"] for r in rows[1:]}
        report("pool_pipeline", rows, {"layers": args.layers, "width": args.width, "prompt": args.prompt,
                                       "decode step client bytes beyond one server": extra,
                                       "target": "<= 1024 bytes beyond one server per decode step"})
        raw = RawEcho()
        try:
            moves = [transfer(b, m * MiB, args.reps, raw) for m in args.sizes]
        finally:
            raw.close()
        report("pool_transfer", moves, {"target": "s2s/raw >= 0.8 at 64 MiB", "reps": args.reps,
                                        "cpu_count": os.cpu_count()})


if __name__ == "__main__":
    main()
