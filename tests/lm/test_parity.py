"""Our logits == transformers' DeepSeek-V2/V3 logits for the same checkpoint (fp32, random weights).

Each case builds a tiny transformers model, randomises every weight (router biases
included, so the biased selection differs from the unbiased weights), saves it with
`save_pretrained`, loads it with `lm.hf.load_hf` and compares logits on random ids.
The MTP layer, which transformers does not build, is checked by hand-adding one in
DeepSeek-V3's published layout and running its block through transformers' decoder layer.
Transformers is a test-only dependency.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lm.hf import load_hf, save_hf

transformers = pytest.importorskip("transformers")
create_causal_mask = pytest.importorskip("transformers.masking_utils").create_causal_mask

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 1.0}


def hf_config(version: int, **changes):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=24,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=1,
                n_group=2, topk_group=1, max_position_embeddings=64, routed_scaling_factor=1.5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if version == 3:
        base["num_mtp_layers"] = 0
        return transformers.DeepseekV3Config(**{**base, **changes})
    base.update(topk_method="greedy", norm_topk_prob=False)  # transformers' V2 never normalises
    return transformers.DeepseekV2Config(**{**base, **changes})


@torch.no_grad()
def randomise(model: torch.nn.Module) -> None:
    """Weights large enough that routing and attention are far from uniform."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(1 + 0.2 * torch.randn_like(p))
        else:
            p.normal_(0, 0.3 if "gate.weight" in name else 0.15)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0, 0.1)


def hf_model(cfg, tmp_path):
    cls = transformers.DeepseekV3ForCausalLM if cfg.model_type == "deepseek_v3" else transformers.DeepseekV2ForCausalLM
    model = cls(cfg).eval()
    randomise(model)
    model.save_pretrained(tmp_path / "hf")
    return model


def assert_same_logits(hf, ours, seq: int = 24):
    ids = torch.randint(0, hf.config.vocab_size, (2, seq))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert want.abs().max() > 1  # not a degenerate model
    assert (got - want).abs().max().item() < 1e-4


CASES = {
    "v3_sigmoid_grouped_qlora": (3, {}),
    "v3_no_q_lora": (3, dict(q_lora_rank=None)),
    "v3_four_groups_two_kept": (3, dict(n_group=4, topk_group=2, num_experts_per_tok=3)),
    "v3_yarn": (3, dict(rope_parameters=YARN)),
    "v3_rope_half_split": (3, dict(rope_interleave=False)),  # weights stored for rotate_half
    "v3_attention_bias": (3, dict(attention_bias=True)),
    "v2_softmax_greedy_no_q_lora": (2, dict(q_lora_rank=None, n_group=None, topk_group=None)),
    # transformers' V2 masks dropped groups with 0.0 where DeepSeek's code uses -inf; softmax
    # scores are > 0 and top-k (3) <= kept experts (2 groups x 2), so both pick the same experts
    "v2_group_limited_yarn": (2, dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                      num_experts_per_tok=3, rope_parameters=YARN)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    version, changes = CASES[case]
    hf = hf_model(hf_config(version, **changes), tmp_path)
    ours = load_hf(tmp_path / "hf")
    assert ours.cfg.num_hidden_layers == 3 and len(ours.mtp) == 0
    if ours.cfg.n_group > 1:  # group limiting must actually drop experts for the case to mean anything
        assert ours.cfg.topk_group < ours.cfg.n_group
    assert_same_logits(hf, ours)


def test_sharded_transformers_checkpoint_and_missing_mtp(tmp_path):
    hf = transformers.DeepseekV3ForCausalLM(hf_config(3, num_mtp_layers=1)).eval()
    randomise(hf)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    with pytest.warns(UserWarning, match="no MTP weights"):
        ours = load_hf(tmp_path / "hf")
    assert len(ours.mtp) == 0
    assert_same_logits(hf, ours)


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_hand_made_mtp_layer_matches_a_transformers_block(tmp_path):
    """DeepSeek-V3's published MTP layout, built by hand around a transformers decoder layer:
    a 4-layer model saved by transformers becomes 3 main layers plus MTP layer model.layers.3
    (enorm, hnorm, eh_proj, shared_head.norm added, embedding and head copied). Our MTP step
    must equal that layer run by transformers between the MTP norms and the shared head."""
    hf = hf_model(hf_config(3, num_hidden_layers=4), tmp_path)
    d, eps, mtp = hf.config.hidden_size, hf.config.rms_norm_eps, "model.layers.3."
    own = {"enorm.weight": 1 + 0.2 * torch.randn(d), "hnorm.weight": 1 + 0.2 * torch.randn(d),
           "eh_proj.weight": 0.15 * torch.randn(d, 2 * d), "shared_head.norm.weight": 1 + 0.5 * torch.randn(d)}
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    tensors.update({mtp + k: v for k, v in own.items()})
    tensors.update({mtp + "embed_tokens.weight": hf.model.embed_tokens.weight.detach().clone(),
                    mtp + "shared_head.head.weight": hf.lm_head.weight.detach().clone()})
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.pop("num_mtp_layers", None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3,
                                                             "num_nextn_predict_layers": 1}))
    ours = load_hf(tmp_path / "hf")
    assert len(ours.layers) == 3 and len(ours.mtp) == 1
    assert torch.equal(ours.mtp[0].norm.weight, own["shared_head.norm.weight"])

    ids, hidden = torch.randint(0, hf.config.vocab_size, (2, 12)), torch.randn(2, 12, d)
    with torch.no_grad():
        got, _ = ours.mtp_step(1, hidden, ours.embed(ids))
        emb = hf.model.embed_tokens(ids)
        x = torch.cat([rms(emb, own["enorm.weight"], eps), rms(hidden, own["hnorm.weight"], eps)], -1)
        x = x @ own["eh_proj.weight"].T
        pos = torch.arange(ids.shape[1])[None]
        mask = create_causal_mask(config=hf.config, inputs_embeds=x, attention_mask=None, cache=None,
                                  position_ids=pos)
        x = hf.model.layers[3](x, attention_mask=mask, position_ids=pos,
                               position_embeddings=hf.model.rotary_emb(x, pos))
        want = hf.lm_head(rms(x, own["shared_head.norm.weight"], eps))
        with_main_norm = hf.lm_head(rms(x, hf.model.norm.weight, eps))
    assert want.abs().max() > 1 and (want - with_main_norm).abs().max() > 0.1  # the norm matters
    assert (got - want).abs().max().item() < 1e-4
    hf.config.num_hidden_layers = 3  # transformers then runs the same 3 main layers as ours
    assert_same_logits(hf, ours)


@pytest.mark.parametrize("version", [3, 2])
def test_save_hf_loads_in_transformers(version, tmp_path):
    hf = hf_model(hf_config(version, rope_parameters=YARN), tmp_path)
    ours = load_hf(tmp_path / "hf")
    save_hf(ours, tmp_path / "ours", model_type=f"deepseek_v{version}")
    cls = type(hf)
    back = cls.from_pretrained(tmp_path / "ours").eval()
    assert back.config.rope_parameters["factor"] == 4.0
    assert_same_logits(back, ours)
