"""Ops that once failed or came back wrong on the remote device, each against eager on a real
``genie serve``: in-place ops that change their tensor's own metadata (and what torch builds on
them: ``matmul`` of a vector, ``quantile``, ``stft``), ops that only write their arguments
(``_foreach_*_``), ``t.data = ...``, ``as_strided`` into part of a kept value's storage, a
diffusion VAE (a kernel that lays its output out otherwise than the meta kernel said), and a
DLRM-style model (``EmbeddingBag``'s auxiliary outputs)."""

from __future__ import annotations

import copy

import _server_fixtures as fx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genie
from genie.graph import Ref
from genie.server import Interpreter

server, remote = fx.server, fx.remote  # fixtures, by name
DEV = "remote_accelerator:0"


def remote_args(*args):
    return [a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args]


def same_as_eager(fn, *args, atol: float = 1e-5) -> None:
    """``fn`` on remote copies of ``args`` gives eager's values, shapes and strides."""
    copies = remote_args(*args)  # first: ``fn`` may change its arguments in place
    want = fn(*args)
    got = fn(*copies)
    want, got = (want, got) if isinstance(want, (tuple, list)) else ([want], [got])
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, genie.LazyTensor)
        assert g.shape == w.shape and g.stride() == w.stride(), (g.shape, g.stride(), w.shape, w.stride())
        torch.testing.assert_close(g.cpu(), w, atol=atol, rtol=1e-5)


# -- in-place ops that change their own tensor's metadata ----------------------------------------
def returns_self(op):
    """``op`` applied in place; the result must be the very tensor it was called on."""
    def fn(t: torch.Tensor) -> torch.Tensor:
        out = op(t)
        assert out is t
        return t
    return fn


METADATA_OPS = {
    "squeeze_": returns_self(lambda t: t.squeeze_()),
    "squeeze_.dim": returns_self(lambda t: t.squeeze_(1)),
    "unsqueeze_": returns_self(lambda t: t.unsqueeze_(0)),
    "transpose_": returns_self(lambda t: t.transpose_(0, 3)),
    "t_": returns_self(lambda t: t.resize_(4, 6).t_()),
    "swapdims_": returns_self(lambda t: t.swapdims_(2, 3)),
    "swapaxes_": returns_self(lambda t: t.swapaxes_(0, 2)),
    "as_strided_": returns_self(lambda t: t.as_strided_((3, 2), (2, 5), 1)),
    "resize_ smaller": returns_self(lambda t: t.resize_(2, 3)),
    "resize_as_": returns_self(lambda t: t.resize_as_(torch.empty(4, 3, device=t.device))),
}


@pytest.mark.parametrize("name", list(METADATA_OPS))
def test_metadata_changing_inplace_ops_update_their_tensor(remote, name):
    same_as_eager(METADATA_OPS[name], torch.arange(24.0).reshape(2, 1, 3, 4))


def test_other_tensors_of_the_old_value_keep_their_shape(remote):
    """As on CUDA, where a ``detach()`` or a view is another TensorImpl: only the tensor the op was
    called on changes its metadata; data writes still reach every tensor of the storage."""
    def fn(x: torch.Tensor) -> tuple:
        x = x * 1
        d, v = x.detach(), x[0]
        x.transpose_(0, 1)
        x.mul_(2)
        return x, d, v

    same_as_eager(fn, torch.arange(6.0).reshape(2, 3))


def test_autograd_through_an_inplace_transpose(remote):
    def fn(w: torch.Tensor) -> torch.Tensor:
        w = w.detach().requires_grad_()
        y = w * 3
        y.t_()
        (y * torch.arange(6.0, device=y.device).reshape(3, 2)).sum().backward()
        return w.grad

    same_as_eager(fn, torch.randn(2, 3))


@pytest.mark.filterwarnings("ignore:An output with one or more elements was resized")  # torch's meta kernel
def test_an_out_tensor_that_would_be_resized_stays_refused(remote):
    with pytest.raises(genie.UnsupportedOpError, match="out= tensor cannot change shape"):
        torch.mul(torch.ones(4, device=DEV), 2, out=torch.empty(2, device=DEV))


def test_data_assignment_takes_the_new_value(remote):
    """``param.data = t`` (model init code) once kept the old value behind the new metadata."""
    lin = nn.Linear(3, 2).to(DEV)
    lin.weight.data = torch.ones(2, 3, device=DEV) * 2
    lin.bias.data = torch.zeros(4, device=DEV)[:2]
    torch.testing.assert_close(lin(torch.ones(1, 3, device=DEV)).cpu(), torch.full((1, 2), 6.0))
    assert isinstance(lin.weight, nn.Parameter) and lin.weight.requires_grad


# -- what torch builds on them ------------------------------------------------------------------------
V, M = torch.randn(3), torch.randn(3, 4)
X = torch.randn(5, 7)
SIGNAL = torch.randn(2, 200)
H, W, T = torch.randn(8), torch.randn(10, 8), torch.tensor(3)
BUILT_ON_THEM = {
    "matmul(vector, matrix)": (torch.matmul, V, M),
    "vector @ matrix": (lambda v, m: v @ m, V, M),
    "__rmatmul__": (lambda v, m: m.__rmatmul__(v), V, M),
    "quantile": (lambda x: torch.quantile(x, 0.3, dim=1), X),
    "quantile, tensor q": (lambda x, q: torch.quantile(x, q), X, torch.tensor([0.1, 0.5, 0.9])),
    "nanquantile": (lambda x: torch.nanquantile(x.masked_fill(x > 1, float("nan")), 0.7, dim=0), X),
    "stft": (lambda s, w: torch.view_as_real(torch.stft(s, 32, hop_length=8, window=w, return_complex=True)),
             SIGNAL, torch.hann_window(32)),
    "linear_cross_entropy, one sample": (lambda h, w, t: F.linear_cross_entropy(h, w, t), H, W, T),
    "linear_cross_entropy, a batch": (lambda h, w, t: F.linear_cross_entropy(h, w, t, reduction="none"),
                                      torch.randn(6, 8), W, torch.randint(0, 10, (6,))),
}


@pytest.mark.parametrize("name", list(BUILT_ON_THEM))
def test_ops_built_on_metadata_inplace_ops_match_eager(remote, name):
    fn, *args = BUILT_ON_THEM[name]
    same_as_eager(fn, *args)


@pytest.mark.parametrize("indices", [torch.tensor([3, 7, 12]), torch.tensor(4),
                                     torch.tensor([1, 4, 2, 5])[::2]])
def test_tensor_split_with_a_tensor_of_indices(remote, indices):
    """Indices stay on the host, as torch requires of a CUDA input too."""
    x = torch.arange(40.0).reshape(20, 2)
    want = torch.tensor_split(x, indices)
    got = torch.tensor_split(x.to(DEV), indices)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu(), w)
    with pytest.raises(RuntimeError, match="expected tensor_indices_or_sections to be on cpu"):
        torch.tensor_split(x.to(DEV), indices.to(DEV))  # as on CUDA


def test_host_index_tensors_index_a_remote_tensor_as_on_cuda(remote):
    rows, mask = torch.tensor([0, 3]), torch.tensor([True, False, True, False, True])

    def fn(x: torch.Tensor) -> tuple:
        y = x * 1
        y[rows] = 7.0
        y.index_put_((rows,), torch.ones(4, device=x.device), accumulate=True)
        return x[rows], x[mask], y

    same_as_eager(fn, torch.randn(5, 4))


# -- as_strided into part of a storage ------------------------------------------------------------
def test_as_strided_into_part_of_a_kept_view_reads_eagers_elements(remote):
    """A kept view of an uploaded constant is copied on the server (a write through it must not
    reach the constant); the copy keeps the whole storage, so an ``as_strided`` with an explicit
    offset reads what eager reads, never other elements or memory nobody wrote."""
    base = torch.arange(30.0)
    b = base.to(DEV)
    tail, grid = b[4:], b.view(5, 6)[:, 2:4]
    tail.cpu(), grid.cpu()  # both kept on the server now
    cases = [
        (tail.as_strided((2, 2), (1, 1), 6), base[4:].as_strided((2, 2), (1, 1), 6)),
        (tail.as_strided((2, 2), (3, 1)), base[4:].as_strided((2, 2), (3, 1))),
        (grid.as_strided((3, 2), (6, 1), 3), base.view(5, 6)[:, 2:4].as_strided((3, 2), (6, 1), 3)),
        (grid.as_strided((3, 2), (6, 1)), base.view(5, 6)[:, 2:4].as_strided((3, 2), (6, 1))),
        ((b * 1)[5:].as_strided((2, 2), (1, 1), 1), (base * 1)[5:].as_strided((2, 2), (1, 1), 1)),
    ]
    for got, want in cases:
        torch.testing.assert_close(got.cpu(), want)
    tail.mul_(0)  # the copy is the client's own: the constant is untouched
    torch.testing.assert_close(b.cpu(), base)


# -- ops that only write their arguments ---------------------------------------------------------
def test_foreach_inplace_ops_write_the_remote_tensors(remote):
    """``_foreach_add_`` returns nothing: it once ran on host copies and left the tensors as they
    were (so ``foreach=True`` optimizers silently did not step)."""
    def fn(a: torch.Tensor, b: torch.Tensor) -> tuple:
        xs, ys = [a * 1, b * 1], [b, a]
        torch._foreach_add_(xs, ys, alpha=2)
        torch._foreach_mul_(xs, 3.0)
        return tuple(xs)

    same_as_eager(fn, torch.randn(4), torch.randn(4))

    def adamw_steps(w: torch.Tensor) -> torch.Tensor:
        w = w.detach().clone().requires_grad_()
        opt = torch.optim.AdamW([w], lr=0.1, foreach=True)
        for _ in range(3):
            opt.zero_grad()
            (w ** 2).sum().backward()
            opt.step()
        return w.detach()

    same_as_eager(adamw_steps, torch.randn(5))


# -- every value's strides on the server are its metadata's ----------------------------------------
class ChannelsLastBlock(nn.Module):
    """A conv of a channels-last input (CPU answers channels-last, the meta kernel contiguous), a
    max pool of one, and a group norm after an elementwise op on a transposed value (CPU keeps its
    input's stride in a dimension of size 1, the meta kernel writes its own): the VAE's mid block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.contiguous(memory_format=torch.channels_last))
        x = F.max_pool2d(x, 2)
        b, c, h, w = x.shape
        seq = x.reshape(b, c, h * w).transpose(1, 2)  # (b, hw, c), as attention does
        x = (seq / 2.0).transpose(1, 2).reshape(b, c, h, w)
        return self.norm(x)


def strides_on_the_server(graph: genie.Graph, *inputs: torch.Tensor) -> list[str]:
    """Run ``graph`` with the server's interpreter; every computed value whose strides differ from
    what its node declares."""
    bad: list[str] = []

    class Checked(Interpreter):
        def step(self, node) -> None:
            super().step(node)
            for i, m in enumerate(node.outputs):
                value = self._value(Ref(node.id, i)) if node.id in self._values else None
                if isinstance(value, torch.Tensor) and value.stride() != m.stride:
                    bad.append(f"{node.op}: {value.stride()} where {m.stride} was declared")

    Checked(graph, device=torch.device("cpu"), constants=graph.constants).run(list(inputs))
    return bad


@pytest.mark.parametrize("batch", [1, 2])
def test_every_value_on_the_server_has_its_declared_strides(remote, batch):
    torch.manual_seed(0)
    block = ChannelsLastBlock().eval()
    x = torch.randn(batch, 8, 8, 8)
    with genie.capture():
        out = block(x)  # noqa: F841 (kept: an output)
    assert strides_on_the_server(genie.get_graph(), x) == []
    with torch.no_grad():  # device mode: group norm accepts what the client said it would get
        want = block(x)
        got = copy.deepcopy(block).to(DEV)(x.to(DEV))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_diffusers_vae_matches_eager(remote):
    import diffusers  # a test dependency (pyproject's test extra): real models no one here wrote

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = vae(x).sample
        got = vae.to(DEV)(x.to(DEV)).sample.cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# -- a recommendation model ----------------------------------------------------------------------
class DLRM(nn.Module):
    """Bag embeddings (sum with per-sample weights, mean), a bottom MLP, pairwise interactions."""

    def __init__(self) -> None:
        super().__init__()
        self.bags = nn.ModuleList([nn.EmbeddingBag(50, 8, mode="sum"), nn.EmbeddingBag(30, 8, mode="mean")])
        self.bottom = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.top = nn.Sequential(nn.Linear(8 + 3, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, dense, idx0, off0, weights0, idx1, off1) -> torch.Tensor:
        x = self.bottom(dense)
        bags = [self.bags[0](idx0, off0, per_sample_weights=weights0), self.bags[1](idx1, off1)]
        feats = torch.stack([x, *bags], 1)
        inter = torch.bmm(feats, feats.transpose(1, 2))
        i, j = torch.triu_indices(3, 3, 1, device=x.device)
        return self.top(torch.cat([x, inter[:, i, j]], dim=1)).squeeze(1)


def dlrm_batch(g: torch.Generator) -> tuple:
    return (torch.randn(4, 4, generator=g), torch.randint(0, 50, (10,), generator=g),
            torch.tensor([0, 2, 5, 7]), torch.rand(10, generator=g), torch.randint(0, 30, (9,), generator=g),
            torch.tensor([0, 3, 3, 6]))


def test_dlrm_with_embedding_bags_matches_eager(remote):
    torch.manual_seed(0)
    ref = DLRM()
    model = DLRM()
    model.load_state_dict(ref.state_dict())
    model.to(DEV)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        batch = dlrm_batch(g)
        torch.testing.assert_close(model(*remote_args(*batch)).cpu(), ref(*batch), rtol=1e-5, atol=1e-6)
    opt_ref, opt = torch.optim.SGD(ref.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # training reads the bags' auxiliary outputs back in their backward
        batch, y = dlrm_batch(g), torch.rand(4, generator=g)
        want = F.mse_loss(ref(*batch), y)
        opt_ref.zero_grad()
        want.backward()
        opt_ref.step()
        got = F.mse_loss(model(*remote_args(*batch)), y.to(DEV))
        opt.zero_grad()
        got.backward()
        opt.step()
        assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item())
