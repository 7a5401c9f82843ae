"""MLA: absorbed cached decode == naive full forward, left padding, RoPE/YaRN conventions, cache ops."""

import math

import pytest
import torch

import lm
from lm.rope import rope_frequencies


def _decode_vs_full(cfg, prefill: int, steps: int, batch: int = 2):
    model = lm.Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prefill + steps))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch, prefill + steps)
        outs = [model(ids[:, :prefill], cache=cache)] if prefill else []
        for i in range(prefill, prefill + steps):
            outs.append(model(ids[:, i:i + 1], cache=cache))
    assert cache.length == prefill + steps
    return (torch.cat(outs, dim=1) - full).abs().max().item()


@pytest.mark.parametrize("q_lora_rank", [0, 16])
@pytest.mark.parametrize("use_yarn", [False, True])
def test_absorbed_decode_matches_full_forward(tiny_config, yarn, q_lora_rank, use_yarn):
    cfg = tiny_config(q_lora_rank=q_lora_rank, rope_scaling=yarn if use_yarn else None)
    assert _decode_vs_full(cfg, prefill=0, steps=32) < 1e-4


def test_prefill_with_cache_then_decode(tiny_config):
    cfg = tiny_config(q_lora_rank=16)
    assert _decode_vs_full(cfg, prefill=12, steps=8) < 1e-4
    assert _decode_vs_full(cfg, prefill=20, steps=0) < 1e-4  # prefill alone (T > 1, empty cache)


def test_left_padded_batch_decode_matches_single_sequences(tiny_config, yarn):
    cfg = tiny_config(q_lora_rank=16, rope_scaling=yarn)
    model = lm.Transformer(cfg).eval()
    lengths, steps = [9, 5], 6
    seqs = [torch.randint(1, cfg.vocab_size, (n + steps,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        ids[b, width - n:] = s[:n]
        mask[b, width - n:] = 1
    with torch.no_grad():
        singles = [model(s[None]) for s in seqs]
        cache = model.new_cache(2, width + steps)
        prefill = model(ids, attention_mask=mask, cache=cache)
        for b, n in enumerate(lengths):
            assert (prefill[b, width - n:] - singles[b][0, :n]).abs().max() < 1e-4
        # the same prompt without a cache (naive path) must agree as well
        assert (model(ids, attention_mask=mask) - prefill).abs().max() < 1e-4
        for i in range(steps):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            nxt = torch.stack([s[n + i] for s, n in zip(seqs, lengths)])[:, None]
            step = model(nxt, attention_mask=mask, cache=cache)
            for b, n in enumerate(lengths):
                assert (step[b, 0] - singles[b][0, n + i]).abs().max() < 1e-4


def test_rope_interleaved_equals_deinterleaved_rotate_half(yarn):
    """Our interleaved pairs give the same q.k as transformers' de-interleave + rotate_half."""
    torch.manual_seed(1)
    cfg = lm.LMConfig(qk_rope_head_dim=8, rope_scaling=yarn)
    rope = lm.RotaryEmbedding(cfg)
    pos = torch.arange(20)[None]
    cos, sin = rope(pos)
    q, k = torch.randn(1, 20, 3, 8), torch.randn(1, 20, 3, 8)
    ours = (lm.apply_rope(q, cos, sin) * lm.apply_rope(k, cos, sin)).sum(-1)

    def rotate_half_style(x):
        x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
        c, s = torch.cat([cos, cos], -1)[:, :, None], torch.cat([sin, sin], -1)[:, :, None]
        half = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
        return x * c + half * s

    theirs = (rotate_half_style(q) * rotate_half_style(k)).sum(-1)
    assert (ours - theirs).abs().max() < 1e-5
    # relative position: the score of a rotated pair depends only on the distance
    a = (lm.apply_rope(q[:, 3:4], cos[:, 3:4], sin[:, 3:4]) * lm.apply_rope(k[:, 3:4], cos[:, 1:2], sin[:, 1:2])).sum()
    b = (lm.apply_rope(q[:, 3:4], cos[:, 12:13], sin[:, 12:13]) * lm.apply_rope(k[:, 3:4], cos[:, 10:11], sin[:, 10:11])).sum()
    assert abs(a - b) < 1e-4


def test_yarn_frequencies_and_softmax_scale(yarn):
    cfg = lm.LMConfig(qk_nope_head_dim=32, qk_rope_head_dim=16, rope_scaling=dict(yarn, mscale_all_dim=0.707))
    inv_freq, amplitude = rope_frequencies(cfg)
    plain, _ = rope_frequencies(cfg.replace(rope_scaling=None))
    # high-frequency dims are kept, the lowest ones are interpolated by `factor`
    assert torch.allclose(inv_freq[0], plain[0]) and torch.allclose(inv_freq[-1], plain[-1] / 4.0)
    assert torch.all(inv_freq <= plain + 1e-12) and torch.all(inv_freq >= plain / 4.0 - 1e-12)
    mscale = 0.1 * 0.707 * math.log(4.0) + 1.0
    assert lm.softmax_scale(cfg) == pytest.approx(48**-0.5 * mscale**2)
    assert amplitude == pytest.approx((0.1 * math.log(4.0) + 1.0) / mscale)
    assert lm.softmax_scale(cfg.replace(rope_scaling=None)) == pytest.approx(48**-0.5)


def test_yarn_matches_transformers(yarn):
    tr = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ours = lm.LMConfig(qk_rope_head_dim=16, rope_theta=10000.0, max_position_embeddings=64,
                       rope_scaling=dict(yarn, mscale=0.9, mscale_all_dim=0.8))
    hf = tr.DeepseekV3Config(hidden_size=64, num_attention_heads=2, qk_rope_head_dim=16,
                             max_position_embeddings=64, rope_scaling=dict(yarn, mscale=0.9, mscale_all_dim=0.8))
    ref_freq, ref_amp = ROPE_INIT_FUNCTIONS["yarn"](hf)
    inv_freq, amp = rope_frequencies(ours)
    assert torch.allclose(inv_freq, ref_freq, rtol=1e-6) and amp == pytest.approx(ref_amp)


def test_cache_crop_reorder_and_size(tiny_config):
    cfg = tiny_config(num_nextn_predict_layers=1)
    model = lm.Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 10))
    cache = model.new_cache(3, 16)
    assert cache.bytes_per_token() == 3 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # 2 main + 1 MTP
    with torch.no_grad():
        model(ids[:, :6], cache=cache)
        model(ids[:, 6:9], cache=cache)  # a "draft" that gets rejected
        cache.crop(6)
        assert cache.length == 6
        redo = model(ids[:, 6:10], cache=cache)
        assert (redo - model(ids)[:, 6:10]).abs().max() < 1e-4
        cache.reorder(torch.tensor([2, 0]))
        assert cache.batch_size == 2 and cache.length == 10
        nxt = torch.randint(0, cfg.vocab_size, (3, 1))
        step = model(nxt[[2, 0]], cache=cache)
        full = model(torch.cat([ids, nxt], 1))[[2, 0], -1]
        assert (step[:, 0] - full).abs().max() < 1e-4
    with pytest.raises(ValueError, match="exceed max_len"):
        model(torch.zeros(2, 7, dtype=torch.long), cache=cache)


def test_attention_mask_shape_error(tiny_config):
    model = lm.Transformer(tiny_config())
    with pytest.raises(ValueError, match=r"expected shape \[2, 5\]"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
