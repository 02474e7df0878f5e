"""Weights by reference: time to the first token and bytes sent, three ways, side by side in one run.

    python bench/weights.py            # a Llama config (8 layers, d=512, ~60 MB of fp32 weights)
    python bench/weights.py --quick    # 2 layers, d=128

- ``upload``: the client builds the model and ``.to(device)``: every weight goes over the wire.
- ``store``: the model is built on the meta device and bound to the server's own copy
  (``genie.remote_state_dict`` against ``genie serve --weights DIR``): the client never holds nor
  sends a weight; the server reads and digest-checks them on the first run.
- ``resident``: the same bound model's second prompt: weights already in the server's pool.

Time to first token is one greedy ``generate(max_new_tokens=1)`` from a fresh process state on a
fresh server (the client's shape and plan caches are warmed on a throwaway model first, so what is
measured is the weights' path). Tokens are checked equal to eager. Writes bench/results/weights.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import _server_fixtures as fx  # noqa: E402  # a real `genie serve` child, as the tests start it
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import genie  # noqa: E402
from genie.runtime import RemoteBackend  # noqa: E402
from genie.server import WeightStore  # noqa: E402

DEV = "remote_accelerator:0"


def _config(quick: bool) -> LlamaConfig:
    width, layers = (128, 2) if quick else (512, 8)
    return LlamaConfig(vocab_size=1024, hidden_size=width, intermediate_size=2 * width,
                       num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                       max_position_embeddings=128,
                       bos_token_id=0, eos_token_id=1, pad_token_id=0)


def _first_token(model, ids: torch.Tensor) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids.to(DEV), max_new_tokens=1, do_sample=False).cpu()
    return out.tolist(), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = _config(args.quick)
    ref = LlamaForCausalLM(cfg).eval()
    weight_bytes = sum(v.numel() * v.element_size() for v in ref.state_dict().values())
    ids = torch.randint(2, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=1, do_sample=False).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "llama").mkdir()
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, f"{root}/llama/model.safetensors")
        WeightStore(root).index_all()  # as `genie weights index` does ahead of time
        for mode in ("upload", "store"):
            with fx.serving("--weights", root) as srv, fx.using(RemoteBackend(srv.address, srv.token)) as b:
                warm = copy.deepcopy(LlamaForCausalLM(_config(True)).eval()).to(DEV)  # client caches
                _first_token(warm, ids[:, :4])
                before = genie.stats()
                t0 = time.perf_counter()
                if mode == "upload":
                    model = copy.deepcopy(ref).to(DEV)
                else:
                    with torch.device("meta"):
                        model = LlamaForCausalLM(cfg).eval()
                    model.load_state_dict(genie.remote_state_dict("llama/model.safetensors"), assign=True)
                    genie.init_meta_buffers(model)
                got, _ = _first_token(model, ids)
                ttft = time.perf_counter() - t0
                assert got == want, (mode, got, want)
                print(mode, "ok", flush=True)
                sent = genie.stats()["bytes_sent"] - before["bytes_sent"]
                rows.append({"mode": mode, "ttft ms": ttft * 1e3, "sent KiB": sent / 1024,
                             "weights KiB": weight_bytes / 1024})
                if mode == "store":
                    before = genie.stats()
                    got, again = _first_token(model, ids)
                    assert got == want
                    rows.append({"mode": "resident", "ttft ms": again * 1e3,
                                 "sent KiB": (genie.stats()["bytes_sent"] - before["bytes_sent"]) / 1024,
                                 "weights KiB": weight_bytes / 1024})
                    loaded = b.server_stats()["store_bytes_loaded"]
    by = {r["mode"]: r for r in rows}
    _common.report("weights", rows, {
        "store ttft / resident ttft": by["store"]["ttft ms"] / by["resident"]["ttft ms"],
        "store ttft / upload ttft": by["store"]["ttft ms"] / by["upload"]["ttft ms"],
        "bytes the server read from its store": loaded,
    })
    print(f"store/resident TTFT: {by['store']['ttft ms'] / by['resident']['ttft ms']:.2f}x, "
          f"store/upload: {by['store']['ttft ms'] / by['upload']['ttft ms']:.2f}x")


if __name__ == "__main__":
    main()
