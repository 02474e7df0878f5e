"""Weights by reference: time to the first token and bytes sent, three ways, side by side in one run.

    python bench/weights.py            # a Llama config (8 layers, d=512, ~76 MB of fp32 weights)
    python bench/weights.py --quick    # 2 layers, d=128

Each row is a fresh client process (cold shape and plan caches alike), timing from building the
model to its first greedy token, against ``genie serve`` on loopback:

- ``upload``: the client builds the model and ``.to(device)``: every weight goes over the wire
  (a server with no weights store).
- ``store``: the model is built on the meta device and bound to the server's own copy
  (``genie.remote_state_dict`` against ``genie serve --weights DIR``, its sidecar index built
  ahead by ``genie weights index``): no weight byte leaves the client; the server reads and
  digest-checks them on the first run.
- ``resident``: the same, against the same server right after ``store``: the weights are already
  in its tenant's pool.
- ``dedup``: the client builds the model and ``.to(device)``, against the store's server: its
  uploads are answered by the store's digests.

Each server first serves a small warm-up client, so that its worker's own first ops (kernel and
allocator set-up) are not charged to the row after it. Tokens are checked equal to eager. Writes
bench/results/weights.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import _server_fixtures as fx  # noqa: E402  # a real `genie serve` child, as the tests start it

DEV = "remote_accelerator:0"


def _config(quick: bool):
    from transformers import LlamaConfig

    width, layers = (128, 2) if quick else (512, 8)
    return LlamaConfig(vocab_size=1024, hidden_size=width, intermediate_size=2 * width,
                       num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                       max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=0)


def _model(quick: bool):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_config(quick)).eval()


def client(mode: str, quick: bool) -> None:
    """One fresh client: the time from building the model to its first token, and what it sent."""
    from transformers import LlamaForCausalLM

    import genie

    ids = torch.randint(2, 1024, (1, 16), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    if mode in ("upload", "dedup", "warm"):
        model = _model(quick).to(DEV)
    else:
        with torch.device("meta"):
            model = LlamaForCausalLM(_config(quick)).eval()
        model.load_state_dict(genie.remote_state_dict("llama/model.safetensors"), assign=True)
        genie.init_meta_buffers(model)
    with torch.no_grad():
        out = model.generate(ids.to(DEV), max_new_tokens=1, do_sample=False).cpu()
    ttft = time.perf_counter() - t0
    print(json.dumps({"tokens": out.tolist(), "ttft": ttft, "sent": genie.stats()["bytes_sent"]}))


def _run_client(mode: str, quick: bool, srv) -> dict:
    env = {**os.environ, "GENIE_SERVER": srv.address, "GENIE_TOKEN": srv.token, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, __file__, "--client", mode] + (["--quick"] if quick else [])
    out = subprocess.run(args, env=env, capture_output=True, timeout=600, check=True)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--client", default=None)
    args = p.parse_args()
    if args.client:
        client(args.client, args.quick)
        return
    from safetensors.torch import save_file

    ref = _model(args.quick)
    weight_bytes = sum(v.numel() * v.element_size() for v in ref.state_dict().values())
    ids = torch.randint(2, 1024, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=1, do_sample=False).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "llama").mkdir()
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, f"{root}/llama/model.safetensors")
        subprocess.run([sys.executable, "-m", "genie", "weights", "index", root], check=True,
                       capture_output=True)
        with fx.serving() as srv:
            _run_client("warm", True, srv)  # the worker's own first ops (kernels, allocator) come first
            rows.append(("upload", _run_client("upload", args.quick, srv)))
        with fx.serving("--weights", root) as srv:
            _run_client("warm", True, srv)
            for mode in ("store", "resident", "dedup"):
                rows.append((mode, _run_client(mode, args.quick, srv)))
    table = []
    for mode, r in rows:
        assert r["tokens"] == want, (mode, r["tokens"], want)
        table.append({"mode": mode, "ttft ms": r["ttft"] * 1e3, "sent KiB": r["sent"] / 1024,
                      "weights KiB": weight_bytes / 1024})
    by = {r["mode"]: r for r in table}
    ratio = by["store"]["ttft ms"] / by["resident"]["ttft ms"]
    vs_upload = by["store"]["ttft ms"] / by["upload"]["ttft ms"]
    _common.report("weights", table, {"store ttft / resident ttft": ratio,
                                      "store ttft / upload ttft": vs_upload})
    print(f"store/resident TTFT: {ratio:.2f}x, store/upload: {vs_upload:.2f}x")


if __name__ == "__main__":
    main()
