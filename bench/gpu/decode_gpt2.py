"""GPT-2 small decode through ``genie serve --device cuda:0`` and ``genie.compile``, against the same
model in local CUDA eager. Random weights (no hub download), greedy tokens must match.

    python bench/gpu/decode_gpt2.py [--steps 32] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

_LISTENING = re.compile(rb"genie serve listening on (\S+):(\d+)")


def _serve() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "genie", "serve", "--host", "127.0.0.1", "--port", "0",
                             "--device", "cuda:0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        hit = _LISTENING.search(line)
        if hit:
            return proc, f"{hit.group(1).decode()}:{hit.group(2).decode()}"
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("decode_gpt2: genie serve --device cuda:0 did not start")


def _decode(model, prompt: torch.Tensor, steps: int, device: str) -> tuple[list[int], list[float]]:
    cur, past, tokens, times = prompt.to(device), None, [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(cur, past_key_values=past, use_cache=True)
        past = out.past_key_values
        tok = int(out.logits[0, -1].argmax().item())
        times.append(time.perf_counter() - t0)
        tokens.append(tok)
        cur = torch.tensor([[tok]]).to(device)
    return tokens, times


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu/decode_gpt2.json"))
    args = parser.parse_args(argv)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cpu_model = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2 small: 12 layers, 768 wide
    prompt = torch.randint(0, 50257, (1, 16))
    local = GPT2LMHeadModel(GPT2Config()).eval()
    local.load_state_dict(cpu_model.state_dict())
    local = local.to("cuda")
    _decode(local, prompt, 2, "cuda")  # warm up cuBLAS
    want, local_times = _decode(local, prompt, args.steps, "cuda")

    proc, address = _serve()
    try:
        os.environ["GENIE_SERVER"] = address
        import genie

        remote = cpu_model.to("remote_accelerator:0")
        remote.forward = genie.compile(remote.forward)
        got, remote_times = _decode(remote, prompt, args.steps, "remote_accelerator:0")
        stats = genie.stats()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    row = {"steps": args.steps, "tokens_match": got == want,
           "local_eager_ms_median": statistics.median(local_times[1:]) * 1e3,
           "genie_ms_median": statistics.median(remote_times[1:]) * 1e3,
           "genie_first_step_ms": remote_times[0] * 1e3, "stats": {k: v for k, v in stats.items()
                                                                  if isinstance(v, (int, float))}}
    print(json.dumps(row, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"name": "decode_gpt2", "device": torch.cuda.get_device_name(), **row}
    args.out.write_text(json.dumps(report, indent=2))
    return 0 if got == want else 1


if __name__ == "__main__":
    sys.exit(main())
