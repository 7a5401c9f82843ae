"""The fast decoder (lm.Decoder) == the reference Transformer, step by step and row by row."""

import pytest
import torch
import torch.nn.functional as F

import lm
from lm.decode import rope_tables, rotate
from lm.rope import apply_rope


def _reference_steps(model, ids, prefill):
    """Reference logits/hidden of prefill then one-token steps, through the absorbed cache path."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    outs = [model(ids[:, :prefill], cache=cache, return_hidden=True)]
    for i in range(prefill, ids.shape[1]):
        outs.append(model(ids[:, i:i + 1], cache=cache, return_hidden=True))
    return torch.cat([o.logits for o in outs], 1), torch.cat([o.hidden for o in outs], 1)


def _decoder_steps(dec, ids, prefill, bound=None):
    b, n = ids.shape
    cache = dec.new_cache(b, n)
    pos = torch.arange(n).expand(b, n)
    outs = [dec(dec.embed(ids[:, :prefill]), cache, pos[:, :prefill], bound=bound)]
    for i in range(prefill, n):
        outs.append(dec(dec.embed(ids[:, i:i + 1]), cache, pos[:, i:i + 1], bound=bound))
    return torch.cat([o.logits for o in outs], 1), torch.cat([o.hidden for o in outs], 1), outs


@pytest.mark.parametrize("q_lora_rank", [0, 16])
@pytest.mark.parametrize("use_yarn", [False, True])
def test_decoder_equals_reference(random_model, yarn, q_lora_rank, use_yarn):
    model = random_model(q_lora_rank=q_lora_rank, rope_scaling=yarn if use_yarn else None,
                         attention_bias=q_lora_rank > 0)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 20))
    with torch.no_grad():
        ref_logits, ref_hidden = _reference_steps(model, ids, prefill=7)
        dec = lm.Decoder(model)
        logits, hidden, _ = _decoder_steps(dec, ids, prefill=7)
        static, _, _ = _decoder_steps(dec, ids, prefill=7, bound=20)  # attend over the whole buffer
    assert (logits - ref_logits).abs().max() < 1e-4
    assert (hidden - ref_hidden).abs().max() < 1e-4
    assert (static - ref_logits).abs().max() < 1e-4


def test_rows_of_different_lengths_share_a_batch(random_model):
    """Each row at its own position == that row decoded alone (what the serving engine relies on)."""
    model = random_model(q_lora_rank=16)
    dec = lm.Decoder(model)
    lengths = [3, 9, 6]
    seqs = [torch.randint(0, model.cfg.vocab_size, (1, n + 1)) for n in lengths]
    with torch.no_grad():
        alone = [_decoder_steps(dec, s, prefill=s.shape[1] - 1)[0][:, -1] for s in seqs]
        cache = dec.new_cache(3, 16)
        for row, s in enumerate(seqs):  # prefill each row into its own slot range
            single = dec.new_cache(1, 16)
            dec(dec.embed(s[:, :-1]), single, torch.arange(s.shape[1] - 1)[None])
            cache.copy_rows(torch.tensor([row]), single, torch.tensor([0]), s.shape[1] - 1)
        last = torch.cat([s[:, -1:] for s in seqs])
        pos = torch.tensor(lengths)[:, None]
        out = dec(dec.embed(last), cache, pos, bound=16)
    for row in range(3):
        assert (out.logits[row, -1] - alone[row][0]).abs().max() < 1e-4


def test_routing_counts_per_row(random_model):
    model = random_model()
    dec = lm.Decoder(model)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 5))
    with torch.no_grad():
        out = dec(dec.embed(ids), dec.new_cache(2, 5), torch.arange(5).expand(2, 5))
        ref = model(ids, return_hidden=True)
    k = model.cfg.num_experts_per_tok
    assert out.counts.shape == (1, 2, model.cfg.n_routed_experts)  # one MoE layer
    assert out.counts.sum(-1).eq(5 * k).all()
    assert torch.equal(out.counts, ref.expert_counts)


def test_mtp_step_equals_reference(random_model):
    model = random_model(num_nextn_predict_layers=2)
    dec = lm.Decoder(model)
    h = torch.randn(2, 6, model.cfg.hidden_size)
    e = torch.randn(2, 6, model.cfg.hidden_size)
    with torch.no_grad():
        ref_cache, cache = model.new_cache(2, 8), dec.new_cache(2, 8)
        ref = model.mtp_step(2, h, e, cache=ref_cache)
        got = dec.mtp_step(2, h, e, cache, torch.arange(6).expand(2, 6))
    assert (got[0] - ref[0]).abs().max() < 1e-4 and (got[1] - ref[1]).abs().max() < 1e-4


def test_rotate_is_apply_rope_bit_for_bit():
    x = torch.randn(2, 3, 4, 8)
    cos, sin = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.equal(rotate(x, *rope_tables(cos, sin)), apply_rope(x, cos, sin))


def test_positions_past_the_cache_are_an_error(random_model):
    dec = lm.Decoder(random_model())
    with pytest.raises(ValueError, match="max_len 4"):
        dec(dec.embed(torch.zeros(1, 1, dtype=torch.long)), dec.new_cache(1, 4), torch.tensor([[4]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3])
def test_small_batch_expert_paths_equal_the_grouped_dispatch(random_model, dtype, tokens):
    """Many experts, few tokens: weight views and gathered weights == the sorted grouped dispatch."""
    model = random_model(n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=3).to(dtype)
    moe = lm.Decoder(model).blocks[1].ffn
    moe.gather_layout()
    x = torch.randn(tokens, model.cfg.hidden_size, dtype=dtype)
    with torch.no_grad():
        weights, idx, _ = lm.route(F.linear(x.float(), moe.gate), moe.bias, moe.cfg)
        grouped, _ = moe.moe.dispatch(x, weights, idx)
        views, gathered = moe._by_views(x, weights, idx), moe._gathered(x, weights, idx)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (views.float() - grouped.float()).abs().max() < tol
    assert (gathered.float() - grouped.float()).abs().max() < tol


def test_compiled_step_equals_eager(random_model):
    """torch.compile of the decode step (static shapes: the whole buffer attended) gives the
    eager step's greedy tokens and logits; the step compiles once, not once per position."""
    torch._dynamo.reset()
    model = random_model(q_lora_rank=16)
    eager, compiled = lm.Decoder(model), lm.Decoder(model).compile()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 6))
    runs = []
    with torch.no_grad():
        for dec in (eager, compiled):
            cache = dec.new_cache(2, 16)
            pos = torch.arange(16).expand(2, 16)
            out = dec(dec.embed(ids), cache, pos[:, :6], compiled=False)
            tok, toks, logits = out.logits[:, -1].argmax(-1, keepdim=True), [], []
            for p in range(6, 14):
                out = dec(dec.embed(tok), cache, pos[:, p:p + 1], bound=16)
                logits.append(out.logits)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(tok)
            runs.append((torch.cat(toks, 1), torch.cat(logits, 1)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert (runs[0][1] - runs[1][1]).abs().max() < 1e-4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_long_prefill_takes_the_expanded_path_with_the_same_numbers(random_model):
    model = random_model(q_lora_rank=16)
    dec = lm.Decoder(model)
    assert dec.blocks[0].attn.expand_from < 30
    ids = torch.randint(0, model.cfg.vocab_size, (2, 36))
    with torch.no_grad():
        ref_logits, _ = _reference_steps(model, ids, prefill=30)
        logits, _, _ = _decoder_steps(dec, ids, prefill=30)
    assert (logits - ref_logits).abs().max() < 1e-4


def test_entry_points_own_the_compiled_shapes(random_model):
    """Under the compile policy (here without compiling: the same shapes, eager) caches round
    up to 64 slots and steps pad rows and tokens to powers of two; the real rows' logits,
    hidden states and routing counts are the unpadded step's. draft() proposes the argmax
    of mtp_step's logits at the last position."""
    model = random_model(q_lora_rank=16, num_nextn_predict_layers=1)
    plain, policy = lm.Decoder(model), lm.Decoder(model)
    policy.compiled = True
    ids = torch.randint(0, model.cfg.vocab_size, (3, 9))
    with torch.no_grad():
        outs = []
        for dec, rows in ((plain, 3), (policy, 4)):
            cache = dec.new_cache(rows, 20)
            assert cache.max_len == (64 if dec is policy else 20)
            first = dec.prefill(dec.embed(ids[:, :6]), cache.rows(3))
            assert first.logits.shape[1] == 1
            outs.append(dec.step(ids[:, 6:], cache, 6))  # 3 rows, 3 tokens: padded to 4 and 4
        a, b = outs
        assert a.logits.shape == b.logits.shape == (3, 3, model.cfg.vocab_size)
        assert (a.logits - b.logits).abs().max() < 1e-4 and (a.hidden - b.hidden).abs().max() < 1e-4
        assert torch.equal(a.counts, b.counts)
        drafted, stepped = plain.new_cache(3, 20), plain.new_cache(3, 20)
        d = plain.draft(a.hidden, ids[:, 6:], drafted, 6)
        logits, h = plain.mtp_step(1, a.hidden, plain.embed(ids[:, 6:]), stepped, torch.arange(6, 9).expand(3, 3))
    assert torch.equal(d.tokens, logits[:, -1].argmax(-1)) and (d.hidden - h[:, -1:]).abs().max() < 1e-5
    # draft() attends and runs the FFN for the last position only, yet writes every position's cache entry
    assert torch.equal(drafted.mtp_layer(1).buf, stepped.mtp_layer(1).buf)
