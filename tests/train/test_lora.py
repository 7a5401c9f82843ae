"""LoRA (train/lora.py): adapters at init change nothing; the experts' update takes the grouped
dispatch and matches a loop over experts; merging gives the same model on every task; saved
adapters round trip; FP8 and LoRA compose; bad settings are named errors."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lm.config import CheckpointError, ConfigError
from lm.loss import IGNORE_INDEX
from lm.moe import RoutedExperts
from mm.model import CaptionModel
from train import fp8
from train import lora as L
from train.config import LoRAConfig, TrainConfig, load_train_config
from train.data.scenes import render, sample_rng, sample_scene
from train.lora_files import load_adapters, save_adapters
from vision.preprocess import build_transform

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for conftest helpers
from conftest import micro_config  # noqa: E402

ALL = LoRAConfig(enabled=True, rank=4, vision=True)


def micro_model(**lm_changes) -> CaptionModel:
    return CaptionModel(micro_config(**lm_changes), image_token_id=3).eval()


def task_batch(model, task: str, n: int = 3, seed: int = 0):
    """Rendered scenes and a teacher-forced `<bos> <image>* prompt caption` batch for one task
    (prompt and caption ids made up: each task its own prompt)."""
    g = torch.Generator().manual_seed(seed)
    tokens, transform = model.num_image_tokens, build_transform(model.vision.data_config)
    prompt = [5 + (ord(c) % 200) for c in model.cfg.tasks[task]]
    ids = torch.tensor([[1] + [model.image_token_id] * tokens + prompt] * n)
    ids = torch.cat([ids, torch.randint(5, 300, (n, 8), generator=g)], 1)
    labels = ids.clone()
    labels[:, : 1 + tokens + len(prompt)] = IGNORE_INDEX
    images = torch.stack([transform(render(sample_scene(sample_rng("test", seed, i)))) for i in range(n)])
    return images, ids, torch.ones_like(ids), labels


def outputs(model, batch):
    """Every output a caption model computes in training: the LM's logits and hidden state, each MTP
    depth's logits, the losses."""
    images, ids, mask, labels = batch
    embeds = model.embed(ids, model.encode_images(images))
    out = model.lm(inputs_embeds=embeds, attention_mask=mask, return_hidden=True)
    mtp = model.lm.mtp_logits(out.hidden, embeds, mask)
    loss = model(images, ids, mask, labels)
    return [out.logits, out.hidden, *mtp, loss.loss, loss.main, loss.mtp]


def randomise_adapters(model, std: float = 0.05, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("lora.") or ".lora." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_adapters_at_init_leave_every_output_bit_identical():
    model = micro_model(mtp_depths=2)
    batch = task_batch(model, "caption")
    with torch.no_grad():
        before = outputs(model, batch)
        model.train()
        model.vision.eval()  # the LM in training mode, the encoder's statistics held
        before_training = outputs(model, batch)
        report = L.apply_lora(model, ALL.replace(dropout=0.1))
        trained_mode = outputs(model, batch)  # the adapters' dropout on, B = 0: still nothing changes
        model.eval()
        after = outputs(model, batch)
    kinds = {n.rsplit(".", 1)[-1] for n in report.adapted}
    assert {"wq", "wkv_a", "wkv_b", "wo", "w1", "w2", "w3"} <= kinds
    assert any(".experts." in n for n in report.adapted) and any(n.startswith("lm.mtp.") for n in report.adapted)
    assert any(n.startswith("vision.") for n in report.adapted)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(a, b) for a, b in zip(before_training, trained_mode))
    randomise_adapters(model)  # and the adapters are really on the path of every output
    with torch.no_grad():
        model.eval()
        moved = outputs(model, batch)
    assert not any(torch.equal(a, b) for a, b in zip(before[:3], moved[:3]))


def experts_and_reference(e=4, d=32, inter=16, rank=4):
    torch.manual_seed(0)
    experts = RoutedExperts(e, d, inter)
    with torch.no_grad():
        for w in (experts.w1, experts.w2, experts.w3):
            w.normal_(0, 0.1)
    L.adapt_experts(experts, ["w1", "w2", "w3"], LoRAConfig(rank=rank, alpha=8.0))
    randomise_adapters(experts, std=0.2)
    scale = 8.0 / rank

    def reference(x, counts):  # each expert on its rows with W + s B A formed explicitly
        out, start = [], 0
        for i, n in enumerate(counts.tolist()):
            w1, w2, w3 = ((getattr(experts, k)[i] + scale * experts.lora[k].B[i] @ experts.lora[k].A[i])
                          for k in ("w1", "w2", "w3"))
            xe = x[start:start + n]
            out.append((F.silu(xe @ w1.T) * (xe @ w3.T)) @ w2.T)
            start += n
        return torch.cat(out)

    return experts, reference


@pytest.mark.parametrize("grouped", [True, False])
def test_expert_adapters_take_the_grouped_dispatch_and_match_a_loop(grouped, monkeypatch):
    experts, reference = experts_and_reference()
    experts.use_grouped_mm = grouped
    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    counts = torch.tensor([5, 0, 7, 3])  # an idle expert included
    x = torch.randn(int(counts.sum()), 32, requires_grad=True)
    y = experts(x, counts)
    want = reference(x, counts)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    params = [x] + [experts.lora[k].A for k in ("w1", "w2", "w3")] + [experts.lora[k].B for k in ("w1", "w2", "w3")]
    got_grads = torch.autograd.grad((y * y).sum(), params)
    want_grads = torch.autograd.grad((want * want).sum(), params)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # base GEMMs 3, adapters 2 per weight: all nine through grouped_mm, none formed as E x out x in
    assert len(calls) == (9 if grouped else 0)
    assert sorted({tuple(s) for s in calls}) == ([] if not grouped else
                                                 sorted({(4, 32, 16), (4, 16, 32), (4, 32, 4), (4, 4, 16), (4, 4, 32),
                                                         (4, 16, 4)}))


@pytest.mark.parametrize("scope", ["micro", "bundled"])
def test_merged_model_equals_the_adapted_one_on_every_task(scope):
    """Merged in place (fp32): within float rounding of the adapted model. Exported (the merged weights
    rounded to bf16): within bf16 precision of it, far closer than the adapters' own effect.
    Not maxima: a rounding can flip a borderline token's expert choice, which changes that token's
    logits by more than any rounding would, so the adapters' bound holds for 90% of the tokens and
    the mean over all of them is held to bf16 precision."""
    from mm.checkpoint import load_checkpoint

    if scope == "micro":
        model = micro_model()
    else:
        model = load_checkpoint(Path(__file__).resolve().parents[2] / "mm" / "default_model")[0].float()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    L.apply_lora(model, ALL)
    randomise_adapters(model, std=0.02)
    merged_bf16 = {k: v.to(torch.bfloat16) for k, v in L.merged_state_dict(model).items()}
    assert merged_bf16.keys() == plain.keys()
    batches = {t: task_batch(model, t, seed=i) for i, t in enumerate(model.cfg.tasks)}

    def logits_of(state):  # a plain model holding `state` (bf16 copied into fp32: what an export gives)
        m = CaptionModel(model.cfg, image_token_id=model.image_token_id).eval()
        m.load_state_dict(state)
        return {t: outputs(m, b)[0] for t, b in batches.items()}

    with torch.no_grad():
        adapted = {t: outputs(model, b)[0] for t, b in batches.items()}
        exported, base = logits_of(merged_bf16), logits_of(plain)
        L.merge_lora(model)
        merged = {t: outputs(model, b)[0] for t, b in batches.items()}
    assert model.state_dict().keys() == plain.keys()  # merge_lora left a plain model
    for t in batches:
        effect = (adapted[t] - base[t]).abs().mean()  # what the adapters change
        torch.testing.assert_close(merged[t], adapted[t], rtol=1e-4, atol=1e-3 * float(effect))
        per_token = (exported[t] - adapted[t]).abs().mean(-1).flatten()
        size = adapted[t].abs().mean()
        typical = per_token.quantile(0.9)  # all but the tokens whose expert choice the rounding flipped
        assert typical < 0.1 * effect and per_token.mean() < 2**-7 * size, (
            t, float(typical), float(per_token.mean()), float(effect), float(size))


def test_saved_adapters_round_trip(tmp_path):
    model = micro_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    L.apply_lora(model, ALL)
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora." in n or n.startswith("projector."))
    randomise_adapters(model)
    save_adapters(model, tmp_path / "a", ALL)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "a" / "adapters.safetensors"))
    assert {k for k in saved if ".lora." not in k} == {n for n, _ in model.projector.named_parameters(prefix="projector")}
    fresh = micro_model()
    fresh.load_state_dict(base)  # the same base model; its adapters start afresh
    L.apply_lora(fresh, ALL)
    assert load_adapters(fresh, tmp_path / "a") == len(saved)
    batch = task_batch(model, "describe")
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(outputs(model, batch), outputs(fresh, batch)))
    other = micro_model()
    L.apply_lora(other, ALL.replace(rank=2))
    with pytest.raises(CheckpointError, match=r"does not fit this model's adapters.*lora\.A: model \(2, "):
        load_adapters(other, tmp_path / "a")
    with pytest.raises(CheckpointError, match="not a saved adapter directory"):
        load_adapters(other, tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"rank": 0}, "TrainConfig.lora: rank must be >= 1"),
    ({"alpha": 0}, "alpha must be > 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"targets": []}, "targets must be a non-empty list"),
    ({"vision_targets": [""]}, "vision_targets must be a non-empty list"),
    ({"rnak": 4}, r"TrainConfig.lora: unknown key\(s\) \['rnak'\]"),
    ({"rank": "8"}, "TrainConfig.lora.rank: expected an integer"),
])
def test_bad_lora_settings_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({"lora": change})


def test_targets_that_match_nothing_and_bad_task_prompts_are_named():
    with pytest.raises(ConfigError, match=r"lora.targets \['q_proj'\] match no layer.*'experts.w2'.*'wkv_b'"):
        L.apply_lora(micro_model(), LoRAConfig(targets=["q_proj"]))
    with pytest.raises(ConfigError, match=r"lora.vision_targets \['qkv'\] match no Linear or Conv2d layer"):
        L.apply_lora(micro_model(), LoRAConfig(vision=True, vision_targets=["qkv"]))
    with pytest.raises(ConfigError, match="lora does not run with pipeline stages > 1"):
        load_train_config(None, ["--lora.enabled=true", "--pipeline.stages=2"])
    with pytest.raises(ConfigError, match="add_tasks must map new task names to non-empty prompts"):
        load_train_config(None, ['--add_tasks={"count": ""}'])
    with pytest.raises(ConfigError, match=r"data.tasks must be tasks the model has a prompt for"):
        load_train_config(None, ['--data.tasks=["count"]'])
    assert load_train_config(None, ['--data.tasks=["count"]', '--add_tasks={"count": "Count:"}']).add_tasks


def test_fp8_base_layers_keep_their_adapters_in_plain_precision():
    """fp8 -> lora: the frozen base GEMMs are FP8, the adapters are not, and fp8_disabled still reaches
    the experts' FP8 GEMM under the LoRA wrapper; converting after LoRA leaves adapted layers alone."""
    model = micro_model(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, kv_lora_rank=128,
                        num_attention_heads=4, qk_nope_head_dim=32, v_head_dim=32)
    model.requires_grad_(False)
    report = fp8.convert_to_fp8(model, module_filter=lambda n, _m: n.startswith("lm."))
    batch = task_batch(model, "caption")
    with torch.no_grad():
        fp8_only = outputs(model, batch)
        with fp8.fp8_disabled(model):
            plain = outputs(model, batch)
    L.apply_lora(model, LoRAConfig(rank=4))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(fp8_only, outputs(model, batch)))
        with fp8.fp8_disabled(model):
            assert all(torch.equal(a, b) for a, b in zip(plain, outputs(model, batch)))
    experts = model.lm.layers[1].ffn.experts
    assert isinstance(model.lm.layers[0].attn.wkv_b, fp8.Fp8Linear) and "lm.layers.1.ffn.experts" in report.converted
    assert isinstance(experts.grouped_linear.original, fp8._Fp8GroupedLinear)
    loss = model(*batch).loss
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".lora." in n for n in trained)
    hooked = micro_model(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, kv_lora_rank=128,
                         num_attention_heads=4, qk_nope_head_dim=32, v_head_dim=32)
    L.apply_lora(hooked, LoRAConfig(rank=4))
    late = fp8.convert_to_fp8(hooked, module_filter=lambda n, _m: n.startswith("lm."))
    reasons = dict(late.skipped)
    assert "forward hooks" in reasons["lm.layers.0.attn.wkv_b"]
    assert "already wrapped" in reasons["lm.layers.1.ffn.experts"]
