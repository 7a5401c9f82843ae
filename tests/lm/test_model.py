"""The assembled Transformer: inputs, outputs, gradients, bf16, init, and a short overfit."""

import pytest
import torch
import torch.nn.functional as F

import lm


def test_outputs_and_embeds_path(tiny_config):
    cfg = tiny_config(aux_loss_alpha=0.001)
    model = lm.Transformer(cfg).eval()
    ids = torch.randint(0, 64, (2, 7))
    out = model(ids, return_hidden=True)
    assert isinstance(out, lm.LMOutput)
    assert out.logits.shape == (2, 7, 64) and out.hidden.shape == (2, 7, 32)
    assert out.aux_loss.dim() == 0 and out.aux_loss > 0
    # hidden is the last layer's output before the final norm
    assert torch.allclose(model.head(model.norm(out.hidden)), out.logits, atol=1e-6)
    assert torch.equal(model(ids), out.logits)
    assert torch.allclose(model(inputs_embeds=model.embed(ids)), out.logits, atol=1e-6)
    assert model(ids[:, :3], return_hidden=True).aux_loss.item() != 0
    assert lm.Transformer(tiny_config()).forward(ids, return_hidden=True).aux_loss.item() == 0
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.embed(ids))
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_parameter_names_follow_the_reference(tiny_config):
    model = lm.Transformer(tiny_config(q_lora_rank=16))
    names = set(model.state_dict())
    for key in ["embed.weight", "layers.0.attn.wq_a.weight", "layers.0.attn.q_norm.weight",
                "layers.0.attn.wq_b.weight", "layers.0.attn.wkv_a.weight", "layers.0.attn.kv_norm.weight",
                "layers.0.attn.wkv_b.weight", "layers.0.attn.wo.weight", "layers.0.attn_norm.weight",
                "layers.0.ffn_norm.weight", "layers.0.ffn.w1.weight", "layers.1.ffn.gate.weight",
                "layers.1.ffn.gate.bias", "layers.1.ffn.experts.w1", "layers.1.ffn.experts.w2",
                "layers.1.ffn.shared_experts.w3.weight", "norm.weight", "head.weight",
                "mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.eh_proj.weight", "mtp.0.block.ffn.gate.bias"]:
        assert key in names, key
    assert model.layers[1].ffn.experts.w1.shape == (8, 16, 32)
    assert model.layers[1].ffn.experts.w2.shape == (8, 32, 16)
    assert not any("inv_freq" in n or n.endswith("load") for n in names)  # derived state is not saved
    assert "layers.1.ffn.gate.bias" not in dict(model.named_parameters())  # moved by balancing only


def test_sum_backward_reaches_every_parameter(tiny_config):
    model = lm.Transformer(tiny_config(num_nextn_predict_layers=0))
    model(torch.randint(0, 64, (2, 9))).sum().backward()  # stride-0 gradient into grouped_mm
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    touched = (model.layers[1].ffn.experts.w1.grad.flatten(1).abs().sum(1) > 0).sum()
    assert touched >= 2


def test_init_scale_and_tied_head(tiny_config):
    cfg = tiny_config(hidden_size=64, initializer_range=0.02, num_hidden_layers=8, first_k_dense_replace=8)
    model = lm.Transformer(cfg)
    assert model.layers[0].attn.wkv_a.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.layers[0].attn.wo.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    tied = lm.Transformer(cfg.replace(tie_word_embeddings=True))
    assert tied.head.weight is tied.embed.weight


def test_bf16_forward_backward_of_tiny_preset():
    model = lm.Transformer(lm.LMConfig()).to(torch.bfloat16)  # the `tiny` preset's LM
    ids = torch.randint(0, 512, (2, 16))
    out = model(ids, return_hidden=True)
    assert out.logits.dtype == torch.bfloat16
    mtp = model.mtp_logits(out.hidden, model.embed(ids))
    loss = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss = loss + lm.mtp_loss(mtp, ids, 0.3)[0]
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g.float()).all() for g in grads)
    assert all(m.load.dtype == torch.float32 for m in lm.moe_layers(model))


def test_overfit_a_tiny_batch(tiny_config):
    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=64, num_nextn_predict_layers=1, bias_update_speed=0.001,
                      initializer_range=0.02, aux_loss_alpha=0.0001)
    model = lm.Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(30):
        out = model(ids, return_hidden=True)
        main = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        mtp, _ = lm.mtp_loss(model.mtp_logits(out.hidden, model.embed(ids)), ids, cfg.mtp_lambda)
        (main + mtp + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        ratios = lm.update_router_bias(model)
        losses.append(main.item())
    assert len(ratios) == 2  # the main MoE layer and the MTP block's
    assert losses[-1] < 0.1 * losses[0], losses
