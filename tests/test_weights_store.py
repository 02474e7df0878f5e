"""Weights by reference against a real ``genie serve --weights DIR``: a client binds a checkpoint the
server holds and never uploads (or holds) its bytes, a store answers uploads by digest, and names
and files that lie are refused for that request alone."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import _server_fixtures as fx
import pytest
import torch
from _server_fixtures import check_served, serving, using
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import genie
from genie.graph import content_digest
from genie.runtime import RemoteBackend

DEV = "remote_accelerator:0"
server, remote = fx.server, fx.remote  # fixtures, by name


def _llama() -> tuple[LlamaConfig, LlamaForCausalLM]:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return cfg, LlamaForCausalLM(cfg).eval()


def _save(model: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    cfg, model = _llama()
    _save(model, root / "llama" / "model.safetensors")
    model.save_pretrained(root / "sharded", max_shard_size="100KB")  # model.safetensors.index.json
    (root / "notes.txt").write_text("not weights")
    (root / "escape.safetensors").symlink_to("/etc/hostname")
    (root / "zero.safetensors").symlink_to("/dev/zero")
    return root


def _meta_llama(cfg: LlamaConfig) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("name", ["llama/model.safetensors", "sharded/model.safetensors.index.json"])
def test_a_bound_checkpoint_generates_eagers_tokens_and_sends_almost_nothing(store, name):
    cfg, ref = _llama()
    with serving("--weights", str(store)) as srv, using(RemoteBackend(srv.address, srv.token)):
        model = _meta_llama(cfg)
        state = genie.remote_state_dict(name)
        assert set(state) >= {k for k in ref.state_dict() if "rotary" not in k}
        assert all(isinstance(t, genie.LazyTensor) and t.device.type == "remote_accelerator"
                   for t in state.values())
        model.load_state_dict(state, assign=True)
        assert genie.init_meta_buffers(model) == ["model.rotary_emb.inv_freq",
                                                  "model.rotary_emb.original_inv_freq"]
        ids = torch.tensor([[3, 5, 7, 9, 11]])
        with torch.no_grad():
            want = ref.generate(ids, max_new_tokens=8, do_sample=False)
            got = model.generate(ids.to(DEV), max_new_tokens=8, do_sample=False).cpu()
        assert got.tolist() == want.tolist()
        stats = genie.stats(server=True)
        weight_bytes = sum(v.numel() * v.element_size() for v in ref.state_dict().values())
        assert stats["bytes_sent"] < 256 << 10 < weight_bytes  # the client never sent the weights
        assert stats["server.store_bytes_loaded"] >= weight_bytes * 0.9


def test_weights_built_locally_are_not_uploaded_when_the_store_holds_them(store):
    torch.manual_seed(1)
    big = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024))
    big = big.eval()  # about 8 MiB of weights
    _save(big, store / "mlp" / "model.safetensors")
    with serving("--weights", str(store)) as srv, using(RemoteBackend(srv.address, srv.token)) as b:
        genie.remote_state_dict("mlp/model.safetensors")  # indexed: its digests are known
        b.close()
    with serving("--weights", str(store)) as srv, using(RemoteBackend(srv.address, srv.token)):
        remote = copy.deepcopy(big).to(DEV)  # a fresh server: its worker indexed the store (sidecar)
        x = torch.randn(4, 1024)
        with torch.no_grad():
            got = remote(x.to(DEV)).cpu()
        torch.testing.assert_close(got, big(x))
        stats = genie.stats()
        assert stats["bytes_sent"] < 256 << 10  # 8 MiB of weights: none of it uploaded
        assert stats["uploads"] == 0 or stats.get("upload_bytes", 0) < 64 << 10


def test_the_store_refuses_names_outside_it_and_never_says_where_it_is(store):
    with serving("--weights", str(store)) as srv, using(RemoteBackend(srv.address, srv.token)) as b:
        for name, says in [("../secret.safetensors", "inside"), ("/etc/passwd.safetensors", "inside"),
                           ("llama/../../x.safetensors", "inside"), ("notes.txt", "not a"),
                           ("escape.safetensors", "outside"), ("zero.safetensors", "outside"),
                           ("nope/model.safetensors", "no such file"), ("", "not a relative")]:
            with pytest.raises(genie.WeightsError, match=says) as e:
                genie.remote_state_dict(name)
            assert str(store) not in str(e.value)
        check_served(b)


def _hostile(path: Path, header: object, data: bytes = b"", length: int | None = None) -> None:
    head = json.dumps(header).encode()
    path.write_bytes((len(head) if length is None else length).to_bytes(8, "little") + head + data)


def test_files_that_lie_are_an_error_for_that_request_only(tmp_path):
    f32 = {"dtype": "F32"}
    _hostile(tmp_path / "past_end.safetensors", {"w": {**f32, "shape": [4], "data_offsets": [0, 16]}},
             b"\0" * 8)
    _hostile(tmp_path / "huge.safetensors",
             {"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}}, b"\0" * 16)
    _hostile(tmp_path / "sizes.safetensors", {"w": {**f32, "shape": [3], "data_offsets": [0, 16]}},
             b"\0" * 16)
    _hostile(tmp_path / "dtype.safetensors",
             {"w": {"dtype": "os.system", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    _hostile(tmp_path / "length.safetensors", {}, b"", length=1 << 60)
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(64))
    with serving("--weights", str(tmp_path)) as srv, using(RemoteBackend(srv.address, srv.token)) as b:
        for name in ["past_end", "huge", "sizes", "dtype", "length", "garbage"]:
            with pytest.raises(genie.WeightsError, match=f"{name}.safetensors"):
                genie.remote_state_dict(f"{name}.safetensors")
        check_served(b)


def test_store_names_fuzzed(store):
    """Random names from a hostile alphabet: each is refused or found, never a crash."""
    rng = random.Random(0)
    pieces = ["..", "/", ".", "llama", "model", ".safetensors", ".index.json", "\\", "%2e", "~", "\x00",
              "sharded", "a" * 300, "escape", "zero"]
    with serving("--weights", str(store)) as srv, using(RemoteBackend(srv.address, srv.token)) as b:
        for _ in range(200):
            name = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
            with contextlib.suppress(genie.WeightsError):
                genie.remote_state_dict(name)
        check_served(b)


def test_a_server_without_a_store_says_so(server, remote):
    with pytest.raises(genie.WeightsError, match="no weights store"):
        genie.remote_state_dict("llama/model.safetensors")
    check_served(remote)


def test_genie_weights_index_builds_the_sidecars_offline(tmp_path):
    torch.manual_seed(2)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                     eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    _save(model.transformer, tmp_path / "gpt2" / "model.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "genie", "weights", "index", str(tmp_path)],
                         capture_output=True, timeout=120, env=env)
    assert out.returncode == 0 and b"tensors indexed" in out.stdout, out.stderr
    side = json.loads((tmp_path / "gpt2" / "model.safetensors.genie-index.json").read_text())
    digests = {name: digest for name, _, _, _, _, digest in side["tensors"]}
    state = model.transformer.state_dict()
    assert digests == {k: content_digest(v.contiguous()) for k, v in state.items()}
