"""MTP: shapes, which token each depth sees and predicts, the loss targets, cached mtp_step == mtp_logits."""

import pytest
import torch

import lm


@pytest.fixture
def make_model(tiny_config):
    def make(depth=2, **kw):
        return lm.Transformer(tiny_config(num_nextn_predict_layers=depth, **kw)).eval()
    return make


def test_shapes_and_causal_dependencies(make_model):
    model = make_model(depth=2)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        out = model(ids, return_hidden=True)
        mtp = model.mtp_logits(out.hidden, model.embed(ids))
        assert [tuple(x.shape) for x in mtp] == [(2, 9, 64), (2, 8, 64)]
        # depth k entry i sees tokens <= i + k: changing token 6 leaves depth-1 entries < 5
        # and depth-2 entries < 4 untouched, and changes the entries that do see it
        ids2 = ids.clone()
        ids2[:, 6] = (ids2[:, 6] + 1) % 64
        out2 = model(ids2, return_hidden=True)
        mtp2 = model.mtp_logits(out2.hidden, model.embed(ids2))
    for k, (a, b) in enumerate(zip(mtp, mtp2), start=1):
        first = 6 - k
        assert (a[:, :first] - b[:, :first]).abs().max() < 1e-5
        assert (a[:, first] - b[:, first]).abs().max() > 1e-4


def test_chained_depths_reuse_the_last_module_on_its_own_output(make_model):
    """mtp_depths 3 with one module: depth k applies module 1 to depth k-1's output and
    Emb(t_{i+k}), the chain speculative decoding drafts with."""
    model = make_model(depth=1, mtp_depths=3)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        out = model(ids, return_hidden=True)
        emb = model.embed(ids)
        got = model.mtp_logits(out.hidden, emb)
        assert [tuple(x.shape) for x in got] == [(2, 9, 64), (2, 8, 64), (2, 7, 64)]
        h = out.hidden
        for k, logits in enumerate(got, start=1):
            n = 10 - k
            cos, sin = model.rope((torch.arange(n))[None].expand(2, n))
            h, _, _ = model.mtp[0](h[:, :n], emb[:, k:k + n], cos, sin)
            assert (logits - model.head(model.mtp[0].norm(h))).abs().max() < 1e-5
    with pytest.raises(lm.ConfigError, match="mtp_depths"):
        make_model(depth=0, mtp_depths=2)
    with pytest.raises(lm.ConfigError, match="mtp_depths"):
        make_model(depth=2, mtp_depths=1)


def test_mtp_loss_targets():
    """Logits that put all mass on t_{i+k+1} give ~0 loss; one position off gives a large loss."""
    b, t, v, depth = 2, 9, 11, 2
    labels = torch.randint(0, v, (b, t))
    labels[0, 7] = lm.IGNORE_INDEX  # ignored target

    def peaked(shift):
        out = []
        for k in range(1, depth + 1):
            logits = torch.zeros(b, t - k, v)
            for i in range(t - k):
                j = min(i + k + 1 + shift, t - 1)
                logits[torch.arange(b), i, labels[:, j].clamp(min=0)] = 50.0
            out.append(logits)
        return out

    loss, parts = lm.mtp_loss(peaked(0), labels, mtp_lambda=0.3)
    assert loss.item() < 1e-6 and set(parts) == {"mtp_1", "mtp_2"}
    bad, parts_bad = lm.mtp_loss(peaked(-1), labels, mtp_lambda=0.3)
    assert bad.item() > 5
    assert bad.item() == pytest.approx(0.3 / 2 * (parts_bad["mtp_1"] + parts_bad["mtp_2"]), rel=1e-5)
    with pytest.raises(ValueError, match="expected T - k"):
        lm.mtp_loss([torch.zeros(b, t, v)], labels, 0.3)


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_cached_mtp_step_matches_mtp_logits(make_model, q_lora_rank):
    """Drafting with the MTP caches, one position at a time, reproduces the training-time logits."""
    model = make_model(depth=2, q_lora_rank=q_lora_rank)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        out = model(ids, return_hidden=True)
        emb = model.embed(ids)
        want = model.mtp_logits(out.hidden, emb)
        cache = model.new_cache(2, 12)
        got1, got2, h1 = [], [], []
        for i in range(11):
            logits, h = model.mtp_step(1, out.hidden[:, i:i + 1], emb[:, i + 1:i + 2], cache=cache)
            got1.append(logits)
            h1.append(h)
        for i in range(10):
            logits, _ = model.mtp_step(2, h1[i], emb[:, i + 2:i + 3], cache=cache)
            got2.append(logits)
    assert cache.mtp_layer(1).length == 11 and cache.mtp_layer(2).length == 10 and cache.length == 0
    assert (torch.cat(got1, 1) - want[0]).abs().max() < 1e-4
    assert (torch.cat(got2, 1) - want[1]).abs().max() < 1e-4


def test_mtp_with_left_padding_matches_unpadded(make_model):
    model = make_model(depth=1)
    seq = torch.randint(1, 64, (7,))
    ids = torch.cat([torch.zeros(3, dtype=torch.long), seq])[None]
    mask = torch.cat([torch.zeros(3), torch.ones(7)])[None].long()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, return_hidden=True)
        padded = model.mtp_logits(out.hidden, model.embed(ids), attention_mask=mask)[0]
        ref = model(seq[None], return_hidden=True)
        single = model.mtp_logits(ref.hidden, model.embed(seq[None]))[0]
    assert (padded[:, 3:] - single).abs().max() < 1e-4
