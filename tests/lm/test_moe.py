"""DeepSeekMoE: routing rules, grouped dispatch == per-token loop, load counting, bias balancing."""

import pytest
import torch
import torch.nn.functional as F

import lm
from lm.moe import MoE, route, sequence_balance_loss

METHODS = [("noaux_tc", "sigmoid", True), ("greedy", "softmax", False),
           ("group_limited_greedy", "softmax", True), ("greedy", "sigmoid", True)]


@pytest.fixture
def moe_config(tiny_config):
    """Factory: 8 experts in 4 groups, top-3 from the best 2 groups, scaled by 2."""
    def make(method, scoring, norm, **kw):
        return tiny_config(hidden_size=32, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                           moe_intermediate_size=16, topk_method=method, scoring_func=scoring,
                           norm_topk_prob=norm, routed_scaling_factor=2.0, **kw)
    return make


def _reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert, straight from the stacked weights."""
    flat = x.reshape(-1, x.shape[-1])
    weights, idx, _ = moe.gate(flat)
    ex = moe.experts
    rows = []
    for n in range(flat.shape[0]):
        y = moe.shared_experts(flat[n])
        for w, e in zip(weights[n], idx[n].tolist()):
            h = F.silu(ex.w1[e] @ flat[n]) * (ex.w3[e] @ flat[n])
            y = y + w * (ex.w2[e] @ h)
        rows.append(y)
    return torch.stack(rows).view_as(x)


@pytest.mark.parametrize("method,scoring,norm", METHODS)
@pytest.mark.parametrize("grouped_mm", [True, False])
def test_grouped_dispatch_matches_per_token_loop(moe_config, method, scoring, norm, grouped_mm, monkeypatch):
    monkeypatch.setattr(lm.RoutedExperts, "use_grouped_mm", grouped_mm)
    moe = lm.Transformer(moe_config(method, scoring, norm)).layers[1].ffn
    if moe.gate.bias is not None:
        moe.gate.bias.normal_(0, 0.3)
    x = torch.randn(2, 11, 32, requires_grad=True)
    y, _, _ = moe(x)
    params = [moe.experts.w1, moe.experts.w2, moe.experts.w3, moe.gate.weight, moe.shared_experts.w1.weight]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *params], g)
    y_ref = _reference_moe(moe, x)
    want = torch.autograd.grad(y_ref, [x, *params], g)
    assert (y - y_ref).abs().max() < 1e-5
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-5


def _brute_force_route(scores, bias, cfg):
    """One token at a time, following the written rule rather than tensor ops."""
    out = []
    per = cfg.n_routed_experts // cfg.n_group
    for s, c in zip(scores.tolist(), (scores + bias).tolist()):
        groups = [c[g * per:(g + 1) * per] for g in range(cfg.n_group)]
        gscore = [sum(sorted(gr, reverse=True)[:2]) for gr in groups]
        kept = sorted(range(cfg.n_group), key=lambda g: -gscore[g])[:cfg.topk_group]
        allowed = [e for e in range(cfg.n_routed_experts) if e // per in kept]
        chosen = sorted(allowed, key=lambda e: -c[e])[:cfg.num_experts_per_tok]
        w = [s[e] for e in chosen]
        out.append({e: wi / sum(w) * cfg.routed_scaling_factor for e, wi in zip(chosen, w)})
    return out


def test_noaux_tc_routing_rule_with_negative_biased_scores(moe_config):
    cfg = moe_config("noaux_tc", "sigmoid", True)
    logits = torch.randn(64, 8) * 2
    bias = torch.randn(8) - 1.5  # mostly negative biased scores: masked groups must lose with -inf
    weights, idx, scores = route(logits, bias, cfg)
    for n, want in enumerate(_brute_force_route(scores, bias, cfg)):
        got = dict(zip(idx[n].tolist(), weights[n].tolist()))
        assert got.keys() == want.keys()
        assert all(abs(got[e] - want[e]) < 1e-6 for e in want)
    # the bias selects, it never weights: weights are the unbiased scores, renormalised
    unbiased = scores.gather(1, idx)
    assert torch.allclose(weights, unbiased / unbiased.sum(-1, keepdim=True) * 2.0)


def test_group_limited_greedy_keeps_topk_groups(moe_config):
    cfg = moe_config("group_limited_greedy", "softmax", False)
    weights, idx, scores = route(torch.randn(128, 8), None, cfg)
    groups = idx // 2
    best = scores.view(128, 4, 2).amax(-1).topk(2, -1)[1]
    for n in range(128):
        assert set(groups[n].tolist()) <= set(best[n].tolist())
    assert torch.allclose(weights, scores.gather(1, idx) * 2.0)  # softmax, not renormalised


def test_stride_zero_grad_backward(moe_config):
    moe = lm.Transformer(moe_config("noaux_tc", "sigmoid", True)).layers[1].ffn
    x = torch.randn(3, 7, 32, requires_grad=True)
    moe(x)[0].sum().backward()
    assert torch.isfinite(x.grad).all() and moe.experts.w2.grad.abs().sum() > 0


def test_load_counting_ignores_padding_and_eval(moe_config):
    moe = lm.Transformer(moe_config("noaux_tc", "sigmoid", True)).layers[1].ffn
    x = torch.randn(2, 6, 32)
    valid = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    moe.eval()
    _, _, counts = moe(x, valid)
    assert counts.sum(-1).tolist() == [4 * 3, 6 * 3] and moe.load.sum() == 0  # the forward's figures come back, not stored
    moe.count_load = True
    moe(x, valid)
    moe.train()
    _, _, counts = moe(x)
    assert moe.load.sum() == (10 + 12) * 3
    assert counts.sum() == 12 * 3


def test_sequence_balance_loss_formula():
    scores = torch.rand(2 * 5, 4)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(10)])
    got = sequence_balance_loss(scores, idx, batch=2)
    want = 0.0
    for b in range(2):
        s, i = scores[b * 5:(b + 1) * 5], idx[b * 5:(b + 1) * 5]
        for e in range(4):
            f = 4 / (2 * 5) * (i == e).any(-1).sum()
            p = (s[:, e] / s.sum(-1)).mean()
            want = want + f * p / 2
    assert got.item() == pytest.approx(float(want), rel=1e-5)


def test_aux_loss_reaches_the_router(moe_config):
    model = lm.Transformer(moe_config("noaux_tc", "sigmoid", True, aux_loss_alpha=0.01))
    out = model(torch.randint(0, 64, (2, 9)), return_hidden=True)
    assert out.aux_loss > 0
    out.aux_loss.backward()
    assert model.layers[1].ffn.gate.weight.grad.abs().sum() > 0


def test_bias_update_balances_a_skewed_router(moe_config):
    cfg = moe_config("noaux_tc", "sigmoid", True, num_nextn_predict_layers=0)
    model = lm.Transformer(cfg).train()
    moe = model.layers[1].ffn
    u = F.normalize(torch.randn(32), dim=0)
    with torch.no_grad():  # inputs share a direction u that the router maps to experts 0 and 1
        moe.gate.weight.normal_(0, 0.2)
        moe.gate.weight[:2] += u

    def batch(n):
        return torch.randn(n, 32) + 1.5 * u

    moe(batch(4096)[None])
    assert lm.load_stats(model)[0]["max_over_mean"] > 2
    lm.update_router_bias(model, gamma=0.01)
    for _ in range(200):  # fresh tokens each step, as in training
        with torch.no_grad():
            moe(batch(256)[None])
        lm.update_router_bias(model, gamma=0.01)
    assert moe.load.sum() == 0  # counters reset by every update
    with torch.no_grad():
        moe(batch(4096)[None])
    assert lm.load_stats(model)[0]["max_over_mean"] < 1.2
    # the bias changed which experts are chosen, never how they are weighted
    weights, idx, scores = moe.gate(batch(512))
    chosen = scores.gather(1, idx)
    assert moe.gate.bias.abs().max() > 0.1
    assert torch.allclose(weights, chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor)


def test_a_frozen_router_keeps_its_bias(moe_config):
    cfg = moe_config("noaux_tc", "sigmoid", True, num_nextn_predict_layers=0)
    model = lm.Transformer(cfg).train()
    moe = model.layers[1].ffn
    with torch.no_grad():
        moe.gate.weight[:2] += 1.0  # skewed: an unfrozen router's bias would move
    model.requires_grad_(False)
    with torch.no_grad():
        moe(torch.randn(1, 256, 32))
    lm.update_router_bias(model, gamma=0.01)
    assert torch.equal(moe.gate.bias, torch.zeros_like(moe.gate.bias))
    assert moe.load.sum() == 0  # the counters still reset
    model.requires_grad_(True)
    with torch.no_grad():
        moe(torch.randn(1, 256, 32))
    lm.update_router_bias(model, gamma=0.01)
    assert moe.gate.bias.abs().max() == 0.01
