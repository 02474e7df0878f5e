"""The vetted-op table: which aten/prims ops a model zoo uses, grouped by why each may run.

    python bench/allowlist.py            # record the zoo, print the groups, say whether
                                         # src/genie/graph/_vetted.py is what it gives
    python bench/allowlist.py --check    # the same, exit 1 if not (another torch may differ)
    python bench/allowlist.py --write    # record it and write src/genie/graph/_vetted.py

The zoo is the repo's tests' models and then some, all with small configs and random weights:
transformers decoders (GPT-2 with sdpa and eager attention, Llama, Qwen2, Mistral, Mixtral's MoE,
Gemma, Phi), encoders and encoder-decoders (BERT, T5, CLIP, ViT, Swin, Whisper, Wav2Vec2 with its
CTC head), CNNs (tests/_models.py's ConvNet, ResNet, ConvNeXt), torch.nn's layers (RNNs packed and
not, transformer layers, every common norm, pool, upsample and loss, EmbeddingBag for
recommendation) and the tensor programs the tests run (factories, FFTs, windows, indexing). Each
runs in inference (forward, generate with a dynamic and a static cache) and training (a loss and
its backward), in eager under a dispatch mode and, for inference, through ``genie.capture()`` and
genie's device with the in-process executor (what genie itself sends: uploads, factories, views).
Ops that take indices into another tensor are in the table only with a check in
genie/server/_checks.py; the rest of
torch's registry stays refused unless the server runs with ``--ops all``. The table is data, not
code: this script is never imported by src/.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from _common import report  # noqa: E402
from _models import bert, convnet, gpt2  # noqa: E402

import genie  # noqa: E402,F401  # registers the remote_accelerator device
from genie.graph import op_name, overload, registry  # noqa: E402
from genie.graph._ops import refusal  # noqa: E402
from genie.runtime import LocalBackend, backend, set_backend  # noqa: E402
from genie.server import InProcessExecutor  # noqa: E402
from genie.server._checks import INDEX_CHECKS, INDEX_LIKE, NOT_INDICES, packet  # noqa: E402

TABLE = ROOT / "src" / "genie" / "graph" / "_vetted.py"
DEV = "remote_accelerator:0"
SEEN: dict[str, set[str]] = {}  # op -> zoo entries that used it


class Recorder(TorchDispatchMode):
    def __init__(self, entry: str) -> None:
        super().__init__()
        self.entry = entry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("aten", "prims"):
            SEEN.setdefault(op_name(func), set()).add(self.entry)
        return func(*args, **(kwargs or {}))


class RecordingExecutor(InProcessExecutor):
    """The in-process executor, noting each op of each graph genie sends it."""

    entry = ""

    def run(self, graph, inputs, **kw):
        for n in graph.nodes:
            if n.op.split(".")[0] in ("aten", "prims"):
                SEEN.setdefault(n.op, set()).add(f"{self.entry} (genie)")
        return super().run(graph, inputs, **kw)


# -- the zoo -------------------------------------------------------------------------------------------
def _llm(name: str) -> nn.Module:
    import transformers as tf

    small = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    cfgs = {
        "llama": tf.LlamaConfig,
        "qwen2": tf.Qwen2Config,
        "mistral": tf.MistralConfig,
        "gemma": tf.GemmaConfig,
        "phi": tf.PhiConfig,
    }
    torch.manual_seed(0)
    if name == "mixtral":
        cfg = tf.MixtralConfig(**small, num_local_experts=4, num_experts_per_tok=2)
        return tf.MixtralForCausalLM(cfg).eval()
    if name == "gemma":
        small["head_dim"] = 16
    cfg = cfgs[name](**small)
    return getattr(
        tf,
        {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "gemma": "Gemma", "phi": "Phi"}[name]
        + "ForCausalLM",
    )(cfg).eval()


def _decoder(build: Callable[[], nn.Module]) -> dict[str, Callable[[str], object]]:
    ids = torch.randint(0, 128, (2, 6))

    def generate(device: str, cache: str | None) -> object:
        kw = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
        if cache:
            kw["cache_implementation"] = cache
        with torch.no_grad():
            return build().to(device).generate(ids.to(device), **kw)

    return {
        "forward": lambda d: build().to(d)(ids.to(d)).logits,
        "generate": lambda d: generate(d, None),
        "generate static": lambda d: generate(d, "static"),
        "train": lambda d: _train(build().train(), lambda m: m(ids, labels=ids).loss),
    }


def _train(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor]) -> None:
    loss(model).backward()


def _encoders() -> dict[str, Callable[[str], object]]:
    import transformers as tf

    torch.manual_seed(0)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    img = torch.randn(2, 3, 32, 32)
    ids = torch.randint(0, 128, (2, 8))

    def vit() -> nn.Module:
        return tf.ViTForImageClassification(
            tf.ViTConfig(**small, image_size=32, patch_size=8, num_labels=5)
        ).eval()

    def swin() -> nn.Module:
        return tf.SwinModel(
            tf.SwinConfig(
                image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4
            )
        ).eval()

    def resnet() -> nn.Module:
        return tf.ResNetForImageClassification(
            tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)
        ).eval()

    def convnext() -> nn.Module:
        return tf.ConvNextModel(tf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1])).eval()

    def clip() -> nn.Module:
        text = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=128,
            max_position_embeddings=16,
        )
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision)).eval()

    def t5() -> nn.Module:
        return tf.T5ForConditionalGeneration(
            tf.T5Config(
                vocab_size=128,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=1,
                num_heads=4,
                decoder_start_token_id=0,
                pad_token_id=0,
            )
        ).eval()

    def whisper() -> nn.Module:
        return tf.WhisperForConditionalGeneration(
            tf.WhisperConfig(
                vocab_size=128,
                d_model=32,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                num_mel_bins=16,
                max_source_positions=16,
                max_target_positions=16,
                decoder_start_token_id=1,
                pad_token_id=0,
                eos_token_id=2,
                bos_token_id=1,
            )
        ).eval()

    def wav2vec2() -> nn.Module:
        return tf.Wav2Vec2ForCTC(
            tf.Wav2Vec2Config(
                vocab_size=12,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                conv_dim=(8, 8),
                conv_stride=(4, 4),
                conv_kernel=(8, 4),
                num_conv_pos_embeddings=8,
                num_conv_pos_embedding_groups=2,
                pad_token_id=0,
                ctc_loss_reduction="mean",
            )
        ).eval()

    audio, mel = torch.randn(2, 800), torch.randn(2, 16, 32)
    labels = torch.randint(1, 12, (2, 5))

    def gen_t5(d: str) -> object:
        with torch.no_grad():
            return t5().to(d).generate(ids.to(d), max_new_tokens=3, do_sample=False)

    return {
        "bert": lambda d: bert().to(d)(ids.to(d)).last_hidden_state,
        "bert train": lambda d: _train(bert().train(), lambda m: m(ids).last_hidden_state.square().mean()),
        "vit": lambda d: vit().to(d)(img.to(d)).logits,
        "vit train": lambda d: _train(vit().train(), lambda m: m(img, labels=torch.tensor([1, 3])).loss),
        "swin": lambda d: swin().to(d)(img.to(d)).last_hidden_state,
        "resnet": lambda d: resnet().to(d)(img.to(d)).logits,
        "resnet train": lambda d: _train(
            resnet().train(), lambda m: m(img, labels=torch.tensor([0, 4])).loss
        ),
        "convnext": lambda d: convnext().to(d)(img.to(d)).last_hidden_state,
        "clip": lambda d: clip().to(d)(input_ids=ids.to(d), pixel_values=img.to(d)).logits_per_image,
        "t5": gen_t5,
        "t5 train": lambda d: _train(t5().train(), lambda m: m(input_ids=ids, labels=ids).loss),
        "whisper": lambda d: whisper().to(d)(mel.to(d), decoder_input_ids=ids[:, :4].to(d)).logits,
        "whisper train": lambda d: _train(whisper().train(), lambda m: m(mel, labels=ids[:, :4]).loss),
        "wav2vec2": lambda d: wav2vec2().to(d)(audio.to(d)).logits,
        "wav2vec2 ctc train": lambda d: _train(wav2vec2().train(), lambda m: m(audio, labels=labels).loss),
    }


class DLRM(nn.Module):
    """Recommendation: pooled sparse features (EmbeddingBag), a dense MLP, pairwise interactions."""

    def __init__(self) -> None:
        super().__init__()
        self.bags = nn.ModuleList(nn.EmbeddingBag(50, 8, mode=m) for m in ("sum", "mean", "max"))
        self.dense = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.top = nn.Linear(4 * 4 + 8, 1)

    def forward(self, dense: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        feats = torch.stack([self.dense(dense), *(b(idx, offsets) for b in self.bags)], 1)
        inter = torch.bmm(feats, feats.transpose(1, 2)).flatten(1)
        return torch.sigmoid(self.top(torch.cat([inter, feats[:, 0]], 1)))


def _layers() -> dict[str, Callable[[str], object]]:
    """torch.nn's layers and losses, as models built from them call them."""
    torch.manual_seed(0)
    x1, x2, x3 = torch.randn(2, 4, 16), torch.randn(2, 4, 8, 8), torch.randn(1, 2, 4, 4, 4)
    seq = torch.randn(5, 3, 8)
    lengths = torch.tensor([5, 3, 2])

    def rnns(d: str) -> list[torch.Tensor]:
        out = []
        for cls in (nn.LSTM, nn.GRU, nn.RNN):
            m = cls(8, 6, num_layers=2, bidirectional=True).eval().to(d)
            out.append(m(seq.to(d))[0])
        return out

    def packed(d: str) -> list[torch.Tensor]:
        out = []
        for cls in (nn.LSTM, nn.GRU):
            m = cls(8, 6).eval().to(d)
            p = nn.utils.rnn.pack_padded_sequence(seq.to(d), lengths)
            out.append(nn.utils.rnn.pad_packed_sequence(m(p)[0])[0])
        return out

    def transformer(d: str, fast: bool) -> torch.Tensor:
        torch.backends.mha.set_fastpath_enabled(fast)
        try:
            enc = (
                nn.TransformerEncoder(
                    nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False
                )
                .eval()
                .to(d)
            )
            dec = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True).eval().to(d)
            mask = nn.Transformer.generate_square_subsequent_mask(4).to(d)
            with torch.no_grad():
                mem = enc(x1.to(d))
                return dec(x1.to(d), mem, tgt_mask=mask)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)

    def convs(d: str) -> list[torch.Tensor]:
        mods = [
            (nn.Conv1d(4, 4, 3, padding="same"), x1),
            (nn.Conv2d(4, 4, 3, padding=1, groups=2), x2),
            (nn.Conv3d(2, 2, 3, padding=1), x3),
            (nn.ConvTranspose2d(4, 2, 2, stride=2), x2),
            (nn.ConvTranspose1d(4, 2, 3), x1),
            (nn.Conv2d(4, 4, 3, dilation=2, padding=2), x2),
        ]
        return [m.eval().to(d)(x.to(d)) for m, x in mods]

    def norms_pools(d: str) -> list[torch.Tensor]:
        mods = [
            (nn.BatchNorm1d(4), x1),
            (nn.BatchNorm2d(4), x2),
            (nn.GroupNorm(2, 4), x2),
            (nn.InstanceNorm2d(4, affine=True), x2),
            (nn.LayerNorm(16), x1),
            (nn.RMSNorm(16), x1),
            (nn.LocalResponseNorm(2), x2),
            (nn.MaxPool1d(2), x1),
            (nn.MaxPool2d(2), x2),
            (nn.AvgPool1d(2), x1),
            (nn.AvgPool2d(2), x2),
            (nn.AdaptiveAvgPool2d((2, 3)), x2),
            (nn.AdaptiveMaxPool2d(2), x2),
            (nn.AdaptiveAvgPool1d(3), x1),
            (nn.MaxPool3d(2), x3),
            (nn.AvgPool3d(2), x3),
            (nn.Upsample(scale_factor=2), x2),
            (nn.Upsample(scale_factor=2, mode="bilinear"), x2),
            (nn.Upsample(scale_factor=2, mode="bicubic"), x2),
            (nn.Upsample(size=20, mode="linear"), x1),
            (nn.PixelShuffle(2), x2),
            (nn.PixelUnshuffle(2), x2),
            (nn.Flatten(), x2),
            (nn.ZeroPad2d(1), x2),
            (nn.ReflectionPad2d(1), x2),
            (nn.ReplicationPad2d(1), x2),
            (nn.ReflectionPad1d(1), x1),
            (nn.Unfold(2), x2),
            (nn.ChannelShuffle(2), x2),
        ]
        return [m.eval().to(d)(x.to(d)) for m, x in mods]

    acts = [
        nn.ReLU(),
        nn.ReLU6(),
        nn.GELU(),
        nn.GELU("tanh"),
        nn.SiLU(),
        nn.Mish(),
        nn.ELU(),
        nn.SELU(),
        nn.CELU(),
        nn.LeakyReLU(),
        nn.PReLU(),
        nn.Softplus(),
        nn.Softsign(),
        nn.Sigmoid(),
        nn.Tanh(),
        nn.Hardtanh(),
        nn.Hardswish(),
        nn.Hardsigmoid(),
        nn.LogSigmoid(),
        nn.Softmax(-1),
        nn.LogSoftmax(-1),
        nn.Softmin(-1),
        nn.GLU(),
        nn.Tanhshrink(),
        nn.Threshold(0.1, 0.0),
        nn.Hardshrink(),
        nn.Softshrink(),
    ]

    def losses(d: str) -> list[torch.Tensor]:
        logits, target = torch.randn(4, 5, device=d), torch.tensor([0, 2, 4, 1], device=d)
        prob, y = torch.rand(4, 5, device=d), torch.rand(4, 5, device=d)
        img_logits, img_target = torch.randn(2, 3, 4, 4, device=d), torch.randint(0, 3, (2, 4, 4), device=d)
        log_probs = torch.randn(12, 2, 6, device=d).log_softmax(2)
        targets = torch.randint(1, 6, (2, 4), device=d)
        return [
            F.cross_entropy(logits, target),
            F.cross_entropy(logits, target, label_smoothing=0.1),
            F.cross_entropy(logits, target, ignore_index=2),
            F.cross_entropy(logits, prob.softmax(1)),
            F.nll_loss(logits.log_softmax(1), target),
            F.cross_entropy(img_logits, img_target),
            F.mse_loss(prob, y),
            F.l1_loss(prob, y),
            F.smooth_l1_loss(prob, y),
            F.huber_loss(prob, y),
            F.binary_cross_entropy(prob, y),
            F.binary_cross_entropy_with_logits(logits, y),
            F.kl_div(prob.log(), y, reduction="batchmean"),
            F.cosine_embedding_loss(prob, y, target.sign()),
            F.margin_ranking_loss(prob[:, 0], y[:, 0], target.sign()),
            F.triplet_margin_loss(prob, y, logits),
            F.multi_margin_loss(logits, target),
            F.soft_margin_loss(prob, y),
            F.ctc_loss(log_probs, targets, torch.tensor([12, 10], device=d), torch.tensor([4, 3], device=d)),
            F.ctc_loss(log_probs, targets, [12, 10], [4, 3]),
            F.ctc_loss(
                log_probs,
                targets.flatten()[:7],
                torch.tensor([12, 10], device=d),
                torch.tensor([4, 3], device=d),
            ),
            F.cosine_similarity(prob, y),
            F.pairwise_distance(prob, y),
            F.normalize(prob),
        ]

    def embeddings(d: str) -> list[torch.Tensor]:
        idx, offsets = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]), torch.tensor([0, 4])
        out = [
            nn.Embedding(10, 4, padding_idx=0).to(d)(idx.to(d)),
            nn.EmbeddingBag(10, 4, mode="sum").to(d)(idx.to(d), offsets.to(d)),
            nn.EmbeddingBag(10, 4, mode="mean", padding_idx=2).to(d)(idx.to(d), offsets.to(d)),
            nn.EmbeddingBag(10, 4, mode="sum").to(d)(
                idx.to(d), offsets.to(d), per_sample_weights=torch.rand(8).to(d)
            ),
            nn.EmbeddingBag(10, 4, mode="max").to(d)(idx.view(2, 4).to(d)),
        ]
        m = DLRM().eval().to(d)
        out.append(
            m(
                torch.randn(2, 4, device=d),
                torch.randint(0, 50, (6,), device=d),
                torch.tensor([0, 3], device=d),
            )
        )
        return out

    def mha(d: str) -> torch.Tensor:
        m = nn.MultiheadAttention(16, 2, batch_first=True).eval().to(d)
        with torch.no_grad():
            return m(x1.to(d), x1.to(d), x1.to(d), need_weights=True)[0]

    def train_all(_: str) -> None:
        for m, x in [
            (
                nn.Sequential(
                    nn.Conv2d(4, 4, 3),
                    nn.BatchNorm2d(4),
                    nn.ReLU(),
                    nn.Dropout(0.2),
                    nn.MaxPool2d(2),
                    nn.Flatten(),
                    nn.Linear(36, 3),
                ),
                x2,
            ),
            (
                nn.Sequential(nn.Embedding(10, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.1)),
                torch.randint(0, 10, (2, 4)),
            ),
            (nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), x1),
        ]:
            _train(m.train(), lambda m, x=x: m(x).square().mean())
        for cls in (nn.LSTM, nn.GRU):
            _train(cls(8, 6, dropout=0.1, num_layers=2), lambda m: m(seq)[0].sum())
        bag = nn.EmbeddingBag(10, 4, mode="mean")
        _train(bag, lambda m: m(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2])).sum())
        log_probs = torch.randn(12, 2, 6).log_softmax(2).requires_grad_()
        F.ctc_loss(
            log_probs, torch.randint(1, 6, (2, 4)), torch.tensor([12, 10]), torch.tensor([4, 3])
        ).backward()
        F.ctc_loss(log_probs, torch.randint(1, 6, (2, 4)), [12, 10], [4, 3]).backward()
        logits = torch.randn(4, 5, requires_grad=True)
        (
            F.cross_entropy(logits, torch.tensor([0, 2, 4, 1])) + F.mse_loss(logits, torch.zeros(4, 5))
        ).backward()

    return {
        "rnn": rnns,
        "rnn packed": packed,  # lengths live on the CPU: eager only
        "transformer layers": lambda d: transformer(d, False),
        "transformer fast path": lambda d: transformer(d, True),
        "convs": convs,
        "norms and pools": norms_pools,
        "activations": lambda d: [a.to(d)(x2.to(d)) for a in acts],
        "losses": losses,
        "embeddings": embeddings,
        "multihead attention": mha,
        "convnet": lambda d: convnet().to(d)(x2[:, :3].to(d)),
        "train layers": train_all,
    }


def _optimizers() -> dict[str, Callable[[str], object]]:
    """Training loops on the device: forward, backward, clipping and optimizer steps."""

    def loop(d: str, model: nn.Module, opt: Callable, x: torch.Tensor, y: torch.Tensor) -> float:
        torch.manual_seed(0)
        model = model.to(d)
        optim = opt(model.parameters())
        total = 0.0
        for set_to_none in (True, False):
            optim.zero_grad(set_to_none=set_to_none)
            loss = (
                F.cross_entropy(model(x.to(d)), y.to(d))
                if y.dtype == torch.int64
                else F.mse_loss(model(x.to(d)), y.to(d))
            )
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            total += loss.item()
        return total

    mlp = lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # noqa: E731
    cnn = lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),  # noqa: E731
        nn.Flatten(),
        nn.Linear(36, 3),
    )
    x, img, y, cls = torch.randn(4, 8), torch.randn(2, 3, 8, 8), torch.randn(4, 4), torch.tensor([0, 2])
    opts = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
        "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
        "sgd foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True),
        "adam foreach": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
        "adamw foreach": lambda p: torch.optim.AdamW(p, lr=0.1, foreach=True),
    }
    out: dict[str, Callable[[str], object]] = {
        f"train mlp {name}": (lambda d, o=o: loop(d, mlp(), o, x, y)) for name, o in opts.items()
    }
    out["train cnn sgd"] = lambda d: loop(d, cnn().train(), opts["sgd"], img, cls)
    return out


def _programs(d: str) -> list[Callable[[], object]]:
    """Tensor programs as users (and the tests) write them: math, shapes, indexing, factories, FFTs."""
    torch.manual_seed(0)
    a, b = torch.randn(4, 3, device=d), torch.randn(4, 3, device=d)
    i = torch.tensor([2, 0, 1], device=d)
    return [
        lambda: a + b * 2 - a / (b.abs() + 1),
        lambda: torch.relu(a).exp().log1p() * torch.sigmoid(b),
        lambda: a.sum(),
        lambda: a.mean(1),
        lambda: a.amax(0),
        lambda: a.std(1),
        lambda: a.var(0),
        lambda: a @ b.T,
        lambda: torch.softmax(a, -1),
        lambda: a.cumsum(1),
        lambda: a.cumprod(0),
        lambda: a[1:, ::2],
        lambda: a[:, 1],
        lambda: a.T.contiguous(),
        lambda: a.reshape(2, 2, 3).permute(2, 0, 1),
        lambda: a.unsqueeze(0).expand(2, 4, 3),
        lambda: torch.cat([a, b]),
        lambda: torch.stack([a, b], 1),
        lambda: a.split(2),
        lambda: a.chunk(2),
        lambda: a.unbind(0),
        lambda: torch.where(a > 0, a, b),
        lambda: a.max(1),
        lambda: a.min(),
        lambda: a.topk(2, 1),
        lambda: a.sort(1),
        lambda: a.argsort(0),
        lambda: a.as_strided((2, 2), (1, 3), 1),
        lambda: a.clamp(-0.5, 0.5),
        lambda: a.flip(0),
        lambda: a.roll(1, 0),
        lambda: a.tril(),
        lambda: a.triu(1),
        lambda: a.masked_fill(a > 0, 0.0),
        lambda: a[a > 0],
        lambda: a.nonzero(),
        lambda: torch.unique(i),
        lambda: a.argmax(1),
        lambda: a.prod(1),
        lambda: a.norm(),
        lambda: a.pow(2).sqrt().rsqrt(),
        lambda: a.round(),
        lambda: a.floor() + a.ceil() + a.trunc(),
        lambda: a.sign() * a.abs(),
        lambda: torch.isin(i, i),
        lambda: a.isnan() | a.isinf(),
        lambda: a.logsumexp(1),
        lambda: a.log_softmax(0),
        lambda: torch.einsum("ij,kj->ik", a, b),
        lambda: torch.div(a, 0.3, rounding_mode="floor"),
        lambda: a // 2,
        lambda: a % 2,
        lambda: -a,
        lambda: torch.lerp(a, b, 0.3),
        lambda: torch.addcmul(a, a, b),
        lambda: torch.baddbmm(a[None, :, :1], a[None], b.T[None, :, :1]),
        lambda: a.to(torch.float16).to(torch.float64),
        lambda: a.int().bool().long(),
        lambda: a.new_zeros(2),
        lambda: a.new_ones(2),
        lambda: a.new_full((2,), 3.0),
        lambda: a.new_empty(2),
        lambda: torch.zeros_like(a),
        lambda: torch.ones_like(a),
        lambda: torch.full_like(a, 2.0),
        lambda: torch.empty_like(a),
        lambda: torch.rand_like(a),
        lambda: torch.randn_like(a),
        lambda: a.index_select(0, i),
        lambda: a.gather(1, i.view(3, 1)),
        lambda: a[i],
        lambda: a.index_put((i,), torch.zeros(3, 3, device=d)),
        lambda: a.clone().index_copy_(0, i, b[:3]),
        lambda: a.clone().scatter_(1, i.view(3, 1), 1.0),
        lambda: a.clone().scatter_add_(0, i.view(3, 1).expand(3, 3), b[:3]),
        lambda: a.take(i),
        lambda: torch.nn.functional.one_hot(i, 3),
        lambda: torch.bincount(i, minlength=4),
        lambda: torch.repeat_interleave(i, 2),
        lambda: i.repeat_interleave(i),
        lambda: a.repeat(2, 1),
        lambda: a.clone().add_(1).mul_(2).sub_(b).div_(3).clamp_(0, 1),
        lambda: a.clone().zero_().fill_(2),
        lambda: a.clone().copy_(b),
        lambda: torch.add(a, b, out=torch.empty(4, 3, device=d)),
        lambda: a.masked_scatter(a > 0, b),
        lambda: torch.cdist(a, b),
        lambda: a.diag_embed(),
        lambda: a.diagonal(),
        lambda: a.squeeze().unsqueeze(1).flatten(),
        lambda: a.view_as(b),
        lambda: a.narrow(0, 1, 2),
        lambda: a.select(0, 1),
        lambda: a.movedim(0, 1),
        lambda: a.type_as(b),
        lambda: a.detach(),
        lambda: torch.searchsorted(torch.arange(5.0, device=d), a),
        lambda: torch.bucketize(a, torch.arange(3.0, device=d)),
        lambda: torch.fft.fft(a),
        lambda: torch.fft.ifft(a),
        lambda: torch.fft.rfft(a),
        lambda: torch.fft.irfft(a),
        lambda: torch.fft.fft2(a),
        lambda: torch.fft.ihfft(a[0]),
        lambda: torch.fft.ihfftn(a),
        lambda: torch.fft.fft(a).conj().imag,
        lambda: torch._neg_view(torch.fft.fft(a[0])),
        lambda: torch.view_as_real(torch.fft.fft(a)),
        lambda: torch.view_as_complex(torch.randn(3, 2, device=d)),
        lambda: torch.stft(
            torch.randn(64, device=d), 16, window=torch.hann_window(16, device=d), return_complex=True
        ),
        lambda: torch.arange(7, device=d),
        lambda: torch.arange(1, 7, 2, device=d),
        lambda: torch.range(0, 3, device=d),
        lambda: torch.zeros(2, 5, dtype=torch.int64, device=d),
        lambda: torch.ones(2, device=d),
        lambda: torch.full((2,), 3.5, device=d),
        lambda: torch.empty(2, 3, device=d),
        lambda: torch.eye(3, device=d),
        lambda: torch.eye(2, 4, device=d),
        lambda: torch.linspace(-1, 1, 9, device=d),
        lambda: torch.logspace(0, 2, 5, device=d),
        lambda: torch.tril_indices(5, 3, -1, device=d),
        lambda: torch.triu_indices(4, 4, device=d),
        lambda: torch.fft.fftfreq(7, 0.5, device=d),
        lambda: torch.fft.rfftfreq(8, device=d),
        lambda: torch.bartlett_window(9, device=d),
        lambda: torch.blackman_window(9, periodic=False, device=d),
        lambda: torch.hamming_window(9, device=d),
        lambda: torch.hann_window(9, device=d),
        lambda: torch.kaiser_window(9, device=d),
        lambda: torch.randn(3, device=d),
        lambda: torch.rand(3, device=d),
        lambda: torch.randint(0, 5, (3,), device=d),
        lambda: torch.randperm(5, device=d),
        lambda: torch.empty(3, device=d).normal_(),
        lambda: torch.empty(3, device=d).uniform_(),
        lambda: torch.bernoulli(torch.full((3,), 0.5, device=d)),
        lambda: torch.multinomial(a.softmax(1), 2),
        lambda: torch.normal(0.0, 1.0, (3,), device=d),
        lambda: torch.tensor([1.0, 2.0], device=d),
        lambda: torch.scalar_tensor(2.0, device=d),
        lambda: torch.empty_strided((2, 2), (1, 2), device=d),
        lambda: a.contiguous(memory_format=torch.contiguous_format),
        lambda: a[0, 0].item(),
        lambda: torch.arange(2, 11, 3, dtype=torch.int16, device=d),
        lambda: torch.arange(1.0, 4.0, 0.5, device=d),
        lambda: torch.arange(5, out=torch.empty(5, device=d)),
        lambda: torch.arange(1, 6, out=torch.empty(5, device=d)),
        lambda: torch.hamming_window(8, True, 0.5, 0.4, device=d),
        lambda: torch.kaiser_window(8, False, 6.0, device=d),
        lambda: torch.randn(4, generator=torch.Generator().manual_seed(5), device=d),
        lambda: torch.empty_like(torch.randn(2, 3, 4, 4, device=d).to(memory_format=torch.channels_last)),
        lambda: F.dropout(a, 0.5, training=True),
        lambda: nn.Dropout(0.2).train()(b),
        lambda: torch.linalg.qr(a),
        lambda: torch.linalg.svd(a),
        lambda: torch.linalg.eigh(a.T @ a),
        lambda: torch.linalg.solve(a.T @ a + torch.eye(3, device=d), b.T),
        lambda: torch.linalg.inv(a.T @ a),
        lambda: torch.linalg.det(a.T @ a),
        lambda: torch.linalg.cholesky(a.T @ a + torch.eye(3, device=d)),
        lambda: torch.linalg.lstsq(a, b),
        lambda: torch.linalg.matrix_norm(a),
        lambda: torch.linalg.vector_norm(a),
        lambda: torch.quantile(a, 0.3, dim=1),
        lambda: a.median(1),
        lambda: a.kthvalue(2, 1),
        lambda: torch.zeros(3, 3, device=d).scatter_reduce(0, i.view(3, 1).expand(3, 3), b[:3], "amax"),
        lambda: torch.zeros(3, 3, device=d).index_reduce_(0, i, b[:3], "prod"),
        lambda: torch.segment_reduce(a.flatten(), "sum", lengths=torch.tensor([5, 7], device=d)),
        lambda: torch.segment_reduce(a.flatten(), "max", offsets=torch.tensor([0, 5, 12], device=d)),
        lambda: nn.utils.rnn.pad_sequence([a, b[:2]], batch_first=True),
        lambda: torch.meshgrid(i, i, indexing="ij"),
        lambda: F.pad(a[None], (1, 1), mode="reflect"),
        lambda: F.pad(a[None], (1, 1), mode="replicate"),
        lambda: F.pad(a, (1, 2)),
        lambda: F.interpolate(a[None], size=5, mode="nearest"),
        lambda: torch.empty(0, device=d).set_(a.clone()),  # Tensor.set_: adopts another tensor's memory
        lambda: torch.empty_permuted((2, 3, 4), (2, 0, 1), device=d),
        # in-place ops that change their tensor's own metadata, and what torch builds on them
        lambda: a.clone()[:, None].squeeze_(),
        lambda: a.clone()[:, None].squeeze_(1),
        lambda: a.clone().unsqueeze_(0),
        lambda: a.clone().transpose_(0, 1),
        lambda: a.clone().t_(),
        lambda: a.clone()[None].swapdims_(1, 2),
        lambda: a.clone()[None].swapaxes_(0, 2),
        lambda: a.clone().as_strided_((3, 2), (2, 3), 1),
        lambda: a.clone().resize_(2, 3),
        lambda: a.clone().resize_(5, 3),
        lambda: a.clone().resize_as_(torch.empty(2, 2, device=d)),
        lambda: a[0] @ b.T,
        lambda: b.T.__rmatmul__(a[0]),
        lambda: torch.quantile(a, i.float() / 3),
        lambda: torch.nanquantile(a.masked_fill(a > 1, float("nan")), 0.7, dim=0),
        lambda: torch.view_as_real(
            torch.stft(
                torch.randn(2, 200, device=d),
                32,
                hop_length=8,
                window=torch.hann_window(32, device=d),
                return_complex=True,
            )
        ),
        lambda: F.linear_cross_entropy(a[:3], b[:3], i),
        lambda: torch.tensor_split(a, torch.tensor([1, 3])),
        lambda: a.clone().index_put_((i[:2],), torch.ones(3, device=d), accumulate=True),
        lambda: a.clone().__setitem__(i[:2], 7.0),
        lambda: torch._foreach_mul_([a.clone(), b.clone()], 3.0),
        lambda: torch._foreach_add_([a.clone(), b.clone()], [b, a], alpha=2),
        lambda: _assign_data(d),
    ]


def _assign_data(d: str) -> torch.Tensor:
    """``param.data = t``, as model init code does."""
    lin = nn.Linear(3, 2).to(d)
    lin.weight.data = torch.ones(2, 3, device=d) * 2
    lin.bias.data = torch.zeros(4, device=d)[:2]
    return lin(torch.ones(1, 3, device=d))


def record(entry: str, fn: Callable[[str], object], genie_too: bool, failed: list[str]) -> None:
    """Eager under the dispatch recorder, then (inference only) through genie's device."""
    try:
        with Recorder(entry):
            fn("cpu")
    except Exception as e:
        failed.append(f"{entry} (eager): {type(e).__name__}: {str(e)[:160]}")
    if not genie_too:
        return
    out = None
    try:  # genie.capture(): the same program on CPU tensors, recorded as a graph
        with genie.capture():
            out = fn("cpu")
        for n in genie.get_graph().nodes:  # (out held: the capture's outputs are its live values)
            if n.op.split(".")[0] in ("aten", "prims"):
                SEEN.setdefault(n.op, set()).add(f"{entry} (capture)")
    except Exception as e:
        failed.append(f"{entry} (capture): {type(e).__name__}: {str(e)[:160]}")
    del out
    RecordingExecutor.entry = entry
    try:
        out = fn(DEV)
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor):
                t.cpu()
    except Exception as e:  # a zoo entry genie cannot run yet: its eager ops still count
        failed.append(f"{entry} (genie): {type(e).__name__}: {str(e)[:160]}")


def _program(k: int) -> Callable[[str], object]:
    return lambda d: _programs(d)[k]()


def zoo() -> dict[str, tuple[Callable[[str], object], bool]]:
    out: dict[str, tuple[Callable[[str], object], bool]] = {}
    decoders: dict[str, Callable[[], nn.Module]] = {"gpt2": gpt2, "gpt2 eager": lambda: gpt2(attn="eager")}
    decoders.update(
        {n: (lambda n=n: _llm(n)) for n in ("llama", "qwen2", "mistral", "mixtral", "gemma", "phi")}
    )
    for name, build in decoders.items():
        for kind, fn in _decoder(build).items():
            out[f"{name} {kind}"] = (fn, kind != "train")
    for name, fn in {**_encoders(), **_layers()}.items():
        out[name] = (fn, "train" not in name and name != "rnn packed")
    for name, fn in _optimizers().items():
        out[name] = (fn, True)  # training through genie too: the optimizers' own ops
    for k in range(len(_programs("cpu"))):
        out[f"tensor program {k}"] = (_program(k), True)
    return out


# -- groups: why each op may run ---------------------------------------------------------------------
REASONS = {
    "checked": "takes arguments its kernel trusts to address memory (indices, offsets, lengths, "
    "per-channel tensors, sizes): each is checked against what it addresses before the op runs "
    "(genie/server/_checks.py)",
    "random": "random numbers from a generator of the run's own, seeded by the client's seed",
    "view": "a view of its input: new sizes and strides over the same memory, which torch checks "
    "against the storage's size",
    "write": "writes its argument in place or to out=: the server derives the write from the schema, "
    "gives a written shared constant a private copy, and refuses a write into a shared constant's "
    "memory through an alias the schemas hide",
    "factory": "makes a new tensor from its arguments (sizes checked against the graph's metadata; "
    "memory that would come uninitialized is zeroed first)",
    "pointwise": "elementwise math on its inputs",
    "reduction": "reduces over dimensions of its input",
    "linear algebra": "matrix products and decompositions of its inputs",
    "nn layer": "a neural-network layer on its inputs (convolution, pooling, normalization, "
    "attention, recurrence, resampling, padding) whose sizes torch checks",
    "loss": "a loss between an input and a target of its shape",
    "data dependent": "an output whose size depends on the values, at most the input's size",
    "shape and copy": "copies, joins, pads or reorders its inputs' elements",
    "host read": "reads one value back to the host",
}
_NN = (
    "conv",
    "pool",
    "norm",
    "upsample",
    "attention",
    "softmax",
    "lstm",
    "gru",
    "rnn",
    "pad",
    "pixel_",
    "channel_shuffle",
    "im2col",
    "col2im",
    "grid_sampler",
    "embedding",
    "dropout",
    "_thnn",
    "gelu",
    "glu",
    "cudnn",
    "mkldnn",
    "_pack_padded",
    "_pad_packed",
    "_weight_norm",
    "prelu",
    "_prelu",
)
_LOSS = ("loss", "binary_cross_entropy", "kl_div", "ctc", "_euclidean_dist", "cdist", "cosine", "pairwise")
_LINALG = (
    "mm",
    "matmul",
    "addmm",
    "addmv",
    "mv",
    "dot",
    "einsum",
    "linear",
    "baddbmm",
    "bmm",
    "linalg_",
    "addbmm",
    "outer",
    "_addmm_activation",
    "tensordot",
    "cholesky",
    "triangular_solve",
)
_REDUCE = (
    "sum",
    "mean",
    "amax",
    "amin",
    "max",
    "min",
    "prod",
    "std",
    "var",
    "norm",
    "logsumexp",
    "all",
    "any",
    "argmax",
    "argmin",
    "cumsum",
    "cumprod",
    "cummax",
    "cummin",
    "aminmax",
    "_log_softmax",
    "count_nonzero",
    "median",
    "mode",
    "kthvalue",
    "topk",
    "sort",
    "argsort",
    "nansum",
    "logcumsumexp",
)
_DATA = ("nonzero", "_unique", "unique", "masked_select", "_local_scalar_dense", "item")
_POINTWISE = ("hardswish", "log_sigmoid_forward", "floor_divide", "clone", "histc")


# ops the zoo's eager runs reach that a genie client never sends (it records the generic op on its
# own device): op packet prefix -> why they stay off the table
EXCLUDED = {
    "aten.mkldnn_": "a CPU backend's internal kernel (oneDNN); its integer arguments (batch_sizes, "
    "hidden_size) are trusted to match its weights",
}
# ops that return their input or a view of it under a schema that says a fresh tensor
HIDDEN_ALIASES = (
    "aten._unsafe_view",
    "aten.unsafe_split",
    "aten.unsafe_split_with_sizes",
    "aten.unsafe_chunk",
    "aten.lift_fresh",
)


def group(op: torch._ops.OpOverload, name: str) -> str:
    base = name.split(".")[1].rstrip("_")
    schema = op._schema
    if packet(name) in INDEX_CHECKS:
        return "checked"
    if torch.Tag.nondeterministic_seeded in op.tags or any(a.name == "generator" for a in schema.arguments):
        return "random"
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return "write"
    if any(r.alias_info is not None for r in schema.returns) or packet(name) in HIDDEN_ALIASES:
        return "view"
    if not any("Tensor" in str(a.type) for a in schema.arguments):
        return "factory"
    if base in _DATA:
        return "data dependent" if base != "_local_scalar_dense" else "host read"
    if any(s in base for s in _LOSS):
        return "loss"
    if base.startswith("_linalg") or any(base.startswith(s) or base.endswith(s) for s in _LINALG):
        return "linear algebra"
    if any(s in base for s in _NN):
        return "nn layer"
    if torch.Tag.pointwise in op.tags or base in _POINTWISE:
        return "pointwise"
    if torch.Tag.reduction in op.tags or any(base == s or base.startswith(s + "_") for s in _REDUCE):
        return "reduction"
    return "shape and copy"


def unchecked_indices(name: str) -> list[str]:
    """Tensor arguments of ``name`` named like indices, when it has no bounds check nor a reviewed
    reason why they index nothing (``_checks.NOT_INDICES``)."""
    if packet(name) in INDEX_CHECKS or packet(name) in NOT_INDICES:
        return []
    schema = overload(registry()[name])._schema
    return [a.name for a in schema.arguments if "Tensor" in str(a.type) and INDEX_LIKE.search(a.name)]


def _twins(name: str) -> list[str]:
    """The in-place or functional twin of a pointwise op (``relu`` -> ``relu_``): the same kernel."""
    ns, pkt, ov = name.split(".")
    twin = pkt[:-1] if pkt.endswith("_") else pkt + "_"
    return [n for n in (f"{ns}.{twin}.{ov}",) if n in registry()]


def vetted() -> dict[str, str]:
    table = {}
    for name in SEEN:
        if name not in registry() or any(name.startswith(p) for p in EXCLUDED):
            continue
        op = overload(registry()[name])
        if refusal(op) is not None:
            continue
        table[name] = group(op, name)
        if table[name] == "pointwise":
            for t in _twins(name):
                if refusal(overload(registry()[t])) is None:
                    table[t] = "pointwise" if not t.split(".")[1].endswith("_") else "write"
    return dict(sorted(table.items()))


def render(table: dict[str, str]) -> str:
    lines = [
        '"""The vetted ops: what ``genie serve`` runs by default (``--ops vetted``), each with why.',
        "",
        "Generated by ``python bench/allowlist.py --write`` from the ops a model zoo uses (transformers",
        "decoders and encoders, CNNs, torch.nn's layers and losses, the tests' tensor programs), in",
        "inference and training; edit that script's zoo or groups, not this file. An op that takes",
        "indices into another tensor is here only with a bounds check in genie/server/_checks.py.",
        '"""',
        "",
        "REASONS: dict[str, str] = {",
    ]
    for k, v in REASONS.items():
        if k in table.values():
            parts = textwrap.wrap(v, 90, drop_whitespace=False)
            lines.append(f"    {k!r}: {parts[0]!r}" + "".join(f"\n        {p!r}" for p in parts[1:]) + ",")
    lines += ["}", "", "# op -> its group in REASONS", "VETTED: dict[str, str] = {"]
    lines += [f"    {name!r}: {g!r}," for name, g in table.items()]
    lines += ["}", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="write src/genie/graph/_vetted.py")
    ap.add_argument("--check", action="store_true", help="exit 1 unless the table is what the zoo gives")
    ap.add_argument("-v", "--verbose", action="store_true", help="say which zoo entries genie could not run")
    opts = ap.parse_args()
    torch.set_num_threads(1)
    old = backend()
    set_backend(LocalBackend("cpu", executor=RecordingExecutor("cpu")))
    entries = zoo()
    failed = []
    try:
        for entry, (fn, genie_too) in entries.items():
            record(entry, fn, genie_too, failed)
    finally:
        set_backend(old)
    for f in failed if opts.verbose else ():
        print(f"not recorded: {f}", file=sys.stderr)
    table = vetted()
    unchecked = {n: args for n in table if (args := unchecked_indices(n))}
    if unchecked:  # never vetted without a check: add one to _checks.INDEX_CHECKS, or a reason
        sys.exit(f"ops the zoo uses take index-like arguments without a bounds check: {unchecked}")
    text = render(table)
    counts: dict[str, int] = {}
    for g in table.values():
        counts[g] = counts.get(g, 0) + 1
    rows = [{"group": g, "ops": n, "reason": REASONS[g][:70]} for g, n in sorted(counts.items())]
    fresh = TABLE.exists() and TABLE.read_text() == text
    report(
        "allowlist",
        rows,
        {"ops": len(table), "zoo entries": len(entries), "failed": failed, "up to date": fresh},
    )
    if opts.write:
        TABLE.write_text(text)
        print(f"wrote {TABLE} ({len(table)} ops)")
        return 0
    if not fresh:
        print(f"{TABLE} is not what the zoo gives here: run python bench/allowlist.py --write")
        return 1 if opts.check else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
