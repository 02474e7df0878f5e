"""Real architectures through remote_accelerator:0 match eager."""

import torch
from _models import bert, convnet, gpt2

import genie

DEV = "remote_accelerator:0"


def _remote_copy(model):
    import copy

    return copy.deepcopy(model).to(DEV)


@torch.no_grad()
def test_gpt2_forward_matches_eager():
    model = gpt2()
    ids = torch.randint(0, 128, (2, 12))
    want = model(ids).logits
    got = _remote_copy(model)(ids.to(DEV)).logits
    assert isinstance(got, genie.LazyTensor)
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_gpt2_eager_attention_matches():
    model = gpt2(attn="eager")
    ids = torch.randint(0, 128, (1, 9))
    torch.testing.assert_close(_remote_copy(model)(ids.to(DEV)).logits.cpu(), model(ids).logits,
                               atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_bert_forward_matches_eager():
    model = bert()
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    want = model(ids, attention_mask=mask).last_hidden_state
    got = _remote_copy(model)(ids.to(DEV), attention_mask=mask.to(DEV)).last_hidden_state
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def _greedy(model, ids, steps, device=None):
    out, past = [], None
    cur = ids if device is None else ids.to(device)
    for _ in range(steps):
        res = model(cur, past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = res.logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt.item()))
        cur = nxt
    return out


@torch.no_grad()
def test_greedy_decode_16_steps_matches_eager():
    model = gpt2()
    ids = torch.randint(0, 128, (1, 5))
    want = _greedy(model, ids, 16)
    got = _greedy(_remote_copy(model), ids, 16, DEV)
    assert got == want


@torch.no_grad()
def test_convnet_matches_eager():
    model = convnet()
    x = torch.randn(2, 3, 17, 17)
    torch.testing.assert_close(_remote_copy(model)(x.to(DEV)).cpu(), model(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_to_fx_on_gpt2_graph_matches_eager():
    model = gpt2()
    ids = torch.randint(0, 128, (1, 8))
    graph = genie.trace(lambda x: model(x).logits, ids)
    gm = graph.to_fx()
    assert isinstance(gm, torch.fx.GraphModule)
    torch.testing.assert_close(gm(ids), model(ids).logits, atol=1e-5, rtol=1e-5)
    other = torch.randint(0, 128, (1, 8))
    torch.testing.assert_close(gm(other), model(other).logits, atol=1e-5, rtol=1e-5)
