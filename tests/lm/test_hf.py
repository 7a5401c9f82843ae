"""lm.hf without transformers: save/load round trips, the key layout, FP8 dequantisation, config mapping, errors."""

import json
import math
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lm
from lm.config import CheckpointError, ConfigError
from lm.hf import config_from_hf, load_hf, save_hf

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 1.0}




def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("changes", [dict(), dict(q_lora_rank=12, rope_scaling=YARN, attention_bias=True),
                                     dict(tie_word_embeddings=True, num_nextn_predict_layers=2),
                                     dict(n_routed_experts=0, num_experts_per_tok=1, n_group=1)])
def test_round_trip_is_bit_exact(random_model, changes, tmp_path):
    model = random_model(**changes)
    for m in model.mtp:  # each MTP depth's final norm is its own weight, unlike the main norm
        assert not torch.equal(m.norm.weight, model.norm.weight)
    back = load_hf(save_hf(model, tmp_path))
    assert back.cfg == model.cfg
    assert_same_state(model, back)
    assert (back.head.weight is back.embed.weight) == model.cfg.tie_word_embeddings
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(model(ids), back(ids))
    out, out_back = model(ids, return_hidden=True), back(ids, return_hidden=True)
    assert torch.equal(model.mtp_logits(out.hidden, model.embed(ids))[0],
                       back.mtp_logits(out_back.hidden, back.embed(ids))[0])


def test_mixed_dtypes_survive_and_dtype_argument_casts(random_model, tmp_path):
    model = random_model().to(torch.bfloat16)
    model.layers[1].ffn.gate.float()  # the router kept in fp32, as published checkpoints do
    back = load_hf(save_hf(model, tmp_path))
    assert_same_state(model, back)
    assert back.layers[1].ffn.gate.weight.dtype == torch.float32 and back.embed.weight.dtype == torch.bfloat16
    wide = load_hf(tmp_path, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in wide.state_dict().values())
    assert wide.rope.inv_freq.dtype == torch.float32 and wide.layers[1].ffn.load.dtype == torch.float32


def test_published_key_layout_and_sharding(random_model, tmp_path):
    model = random_model(q_lora_rank=12)
    save_hf(model, tmp_path, shard_size=4096)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    names = set(index["weight_map"])
    layer, mtp = "model.layers.1.", "model.layers.2."  # 2 main layers, MTP at index num_hidden_layers
    for key in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                "model.layers.0.mlp.gate_proj.weight", layer + "self_attn.q_a_proj.weight",
                layer + "self_attn.q_a_layernorm.weight", layer + "self_attn.q_b_proj.weight",
                layer + "self_attn.kv_a_proj_with_mqa.weight", layer + "self_attn.kv_a_layernorm.weight",
                layer + "self_attn.kv_b_proj.weight", layer + "self_attn.o_proj.weight",
                layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight",
                layer + "mlp.gate.weight", layer + "mlp.gate.e_score_correction_bias",
                layer + "mlp.experts.7.down_proj.weight", layer + "mlp.shared_experts.up_proj.weight",
                mtp + "enorm.weight", mtp + "hnorm.weight", mtp + "eh_proj.weight", mtp + "embed_tokens.weight",
                mtp + "shared_head.norm.weight", mtp + "shared_head.head.weight", mtp + "mlp.experts.0.gate_proj.weight"]:
        assert key in names, key
    with safe_open(tmp_path / index["weight_map"][layer + "mlp.experts.3.up_proj.weight"], "pt") as f:
        assert torch.equal(f.get_tensor(layer + "mlp.experts.3.up_proj.weight"), model.layers[1].ffn.experts.w3[3])
    with safe_open(tmp_path / index["weight_map"][mtp + "shared_head.norm.weight"], "pt") as f:
        assert torch.equal(f.get_tensor(mtp + "shared_head.norm.weight"), model.mtp[0].norm.weight)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert_same_state(model, load_hf(tmp_path))
    save_hf(model, tmp_path)  # one file now: the old shards and index must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def quantise_fp8(w: torch.Tensor, block: int = 128):
    """Per-block e4m3 quantisation (DeepSeek-V3's weight format), block by block."""
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(math.ceil(w.shape[0] / block), math.ceil(w.shape[1] / block))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_checkpoint_dequantises_within_rounding_error(random_model, tmp_path):
    # 160 and 200 are not multiples of 128: edge blocks are partial
    model = random_model(hidden_size=160, intermediate_size=200, moe_intermediate_size=136, kv_lora_rank=144)
    save_hf(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    originals, scales = {}, {}
    for name in list(tensors):
        if name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight"):
            originals[name] = tensors[name]
            tensors[name], tensors[name + "_scale_inv"] = quantise_fp8(tensors[name])
            scales[name] = tensors[name + "_scale_inv"]
    assert any(".experts." in n for n in originals) and any("kv_b_proj" in n for n in originals)
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = load_hf(tmp_path)
    assert loaded.layers[0].attn.wkv_b.weight.dtype == torch.float32
    got = dict(zip([n for n, _ in lm.hf._hf_tensors(loaded)], [t for _, t in lm.hf._hf_tensors(loaded)]))
    for name, w in originals.items():
        s = scales[name].repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
        # e4m3 rounding: half a step of 3 mantissa bits, or of the subnormal spacing 2^-9 (times the scale)
        bound = torch.maximum(w.abs() * 2**-4, s * 2**-10) * 1.0001
        assert ((got[name] - w).abs() <= bound).all(), name
        assert not torch.equal(got[name], w)
    ids = torch.randint(0, 64, (2, 9))
    ref, out = model(ids), loaded(ids)
    # ~6% error per weight, compounded over layers (and an occasional flipped expert choice)
    assert ((out - ref).norm() / ref.norm()).item() < 0.3


def test_published_v3_and_v2_lite_configs_map():
    v3 = {"architectures": ["DeepseekV3ForCausalLM"], "auto_map": {}, "model_type": "deepseek_v3",
          "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
          "num_hidden_layers": 61, "num_nextn_predict_layers": 1, "num_attention_heads": 128,
          "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "ep_size": 1,
          "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
          "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
          "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
          "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
          "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                                "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                                "type": "yarn"},
          "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]},
          "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "bos_token_id": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg, interleaved = config_from_hf(v3)
    assert interleaved and cfg.q_lora_rank == 1536 and cfg.n_group == 8 and cfg.num_nextn_predict_layers == 1
    assert cfg.rope_scaling["factor"] == 40 and cfg.rope_scaling["type"] == "yarn" and cfg.rope_theta == 10000.0
    lite = {**v3, "model_type": "deepseek_v2", "q_lora_rank": None, "scoring_func": "softmax",
            "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "aux_loss_alpha": 0.001}
    del lite["num_nextn_predict_layers"], lite["rope_scaling"]
    cfg, _ = config_from_hf(lite)
    assert cfg.q_lora_rank == 0 and cfg.scoring_func == "softmax" and cfg.num_nextn_predict_layers == 0
    assert cfg.rope_scaling is None and cfg.aux_loss_alpha == 0.001
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        config_from_hf({**v3, "model_type": "llama"})
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        config_from_hf({k: v for k, v in v3.items() if k != "kv_lora_rank"})
    with pytest.warns(UserWarning, match="sliding_window"):
        config_from_hf({**v3, "sliding_window": 4096})


def rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


def test_errors_name_the_tensor(random_model, tmp_path):
    save_hf(random_model(), tmp_path)
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    rewrite(tmp_path, lambda t: t.update({key: torch.zeros(32, 10)}))
    with pytest.raises(ValueError, match=r"kv_b_proj\.weight' has shape \[32, 10\], expected \[32, 16\]"):
        load_hf(tmp_path)
    rewrite(tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="kv_b_proj"):
        load_hf(tmp_path)
    rewrite(tmp_path, lambda t: t.update({key: torch.zeros(32, 16), "model.layers.1.mlp.extra.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"mlp\.extra\.weight"):
        load_hf(tmp_path)
    fp8 = "model.layers.0.mlp.up_proj.weight"
    rewrite(tmp_path, lambda t: (t.pop("model.layers.1.mlp.extra.weight"),
                                 t.update({fp8: t[fp8].to(torch.float8_e4m3fn)})))
    with pytest.raises(ValueError, match=r"up_proj\.weight_scale_inv of shape \[1, 1\], found none"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*model_type 'mistral'") as e:
        load_hf(tmp_path)
    assert str(e.value).count("config.json") == 1


def test_shared_head_norm_is_the_mtp_final_norm(random_model, tmp_path):
    model = random_model()
    save_hf(model, tmp_path)
    key = "model.layers.2.shared_head.norm.weight"  # 2 main layers: the MTP layer is model.layers.2
    norm = 1 + 0.5 * torch.randn(32)
    rewrite(tmp_path, lambda t: t.update({key: norm}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = load_hf(tmp_path)
    assert torch.equal(back.mtp[0].norm.weight, norm) and torch.equal(back.norm.weight, model.norm.weight)
    hidden, embeds = torch.randn(2, 7, 32), back.embed(torch.randint(0, 64, (2, 7)))
    with torch.no_grad():
        logits, h = back.mtp_step(1, hidden, embeds)
        before, _ = model.mtp_step(1, hidden, embeds)
        manual = back.head(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + back.cfg.rms_norm_eps) * norm)
        model.mtp[0].norm.weight.copy_(norm)
        explicit, _ = model.mtp_step(1, hidden, embeds)
    assert (logits - before).abs().max() > 0.1  # the loaded norm is the one used
    assert torch.equal(logits, explicit)
    torch.testing.assert_close(logits, manual)


def test_mtp_layer_without_shared_head_norm_is_an_error(random_model, tmp_path):
    save_hf(random_model(), tmp_path)
    rewrite(tmp_path, lambda t: t.pop("model.layers.2.shared_head.norm.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.shared_head\.norm\.weight.*own final norm"):
        load_hf(tmp_path)
    rewrite(tmp_path, lambda t: [t.pop(n) for n in list(t) if n.startswith("model.layers.2.")])
    with pytest.warns(UserWarning, match="no MTP weights"):  # no MTP layer at all: loads without MTP
        assert len(load_hf(tmp_path).mtp) == 0


def test_v2_refuses_the_v3_router(random_model, tmp_path):
    with pytest.raises(ConfigError, match="deepseek_v3"):
        save_hf(random_model(), tmp_path, model_type="deepseek_v2")
    model = random_model(topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False)
    back = load_hf(save_hf(model, tmp_path, model_type="deepseek_v2"))
    assert back.cfg == model.cfg
    assert_same_state(model, back)


def test_directory_problems_name_the_file(random_model, tmp_path):
    save_hf(random_model(), tmp_path, shard_size=4096)
    index = tmp_path / "model.safetensors.index.json"
    good_index = index.read_text()
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"index\.json has no 'weight_map'"):
        load_hf(tmp_path)
    index.write_text("{oops")
    with pytest.raises(CheckpointError, match=r"index\.json: not a readable JSON file"):
        load_hf(tmp_path)
    index.write_text(good_index)
    shard = tmp_path / sorted(set(json.loads(good_index)["weight_map"].values()))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name}: not a readable safetensors file"):
        load_hf(tmp_path)
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_hf(tmp_path)
    config = tmp_path / "config.json"
    config.write_text("{\"model_type\": ")
    with pytest.raises(CheckpointError, match=r"config\.json: not a readable JSON file"):
        load_hf(tmp_path)
    config.unlink()
    with pytest.raises(CheckpointError, match=r"config\.json does not exist"):
        load_hf(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hf(tmp_path / "nowhere")


def test_unsupported_tensor_dtype_is_named(random_model, tmp_path):
    save_hf(random_model(), tmp_path)
    key = "model.layers.0.mlp.up_proj.weight"
    rewrite(tmp_path, lambda t: t.update({key: t[key].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"{key}.*dtype I32"):
        load_hf(tmp_path)


def test_layer_count_is_checked_before_the_model_is_built(random_model, tmp_path, monkeypatch):
    save_hf(random_model(), tmp_path)  # 2 layers + the MTP layer
    config = tmp_path / "config.json"
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "num_hidden_layers": 20000}))

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(lm.hf, "Transformer", never)
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=20000, but the weights have layers 0\.\.2"):
        load_hf(tmp_path)
    config.write_text(json.dumps({**cfg, "num_hidden_layers": 1, "num_nextn_predict_layers": 0}))
    with pytest.raises(CheckpointError, match=r"layers \[1, 2\] beyond num_hidden_layers=1"):
        load_hf(tmp_path)
