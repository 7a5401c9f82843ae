"""`mm finetune`: the projector stage trains only the projector; an HF-format LM plus a timm
encoder becomes a captioner; frozen parts stay bit-identical; the encoder warm-up is skipped."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lm
from mm.checkpoint import load_checkpoint
from mm.cli import main
from train import vision_warmup as W


def final_weights(out_dir):
    ckpts = sorted((out_dir / "checkpoints").iterdir())
    return load_file(str(ckpts[-1] / "model.safetensors"))


def changed(before: dict, after: dict, prefix: str) -> list[bool]:
    return [not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)]


def short_run(synth_shards, out):
    return ["--data", synth_shards["train"], "--out", str(out), "--optim.max_steps=3", "--optim.batch_size=8",
            "--optim.warmup_steps=1", "--precision=fp32", "--channels_last=false", "--data.num_workers=0",
            "--data.shuffle=10", "--log_every=1", "--save_every=3"]


def test_projector_stage_from_a_checkpoint_trains_only_the_projector(trained_micro, synth_shards, tmp_path,
                                                                    monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(W, "warm_up_vision", lambda *a, **k: calls.append(k))
    config = tmp_path / "with-warmup.json"
    config.write_text(json.dumps({"vision_warmup": {"steps": 5}}))
    rc = main(["finetune", "--from", str(trained_micro), "--stage", "projector", "--config", str(config)]
              + short_run(synth_shards, tmp_path / "run"))
    assert rc == 0
    assert calls == [] and "vision_warmup is skipped" in capsys.readouterr().err
    before, after = load_file(str(trained_micro / "model.safetensors")), final_weights(tmp_path / "run")
    assert before.keys() == after.keys()
    assert any(changed(before, after, "projector."))
    assert not any(changed(before, after, "vision.")) and not any(changed(before, after, "lm."))


def test_hf_language_model_plus_timm_encoder_with_the_lm_frozen(trained_micro, synth_shards, tmp_path):
    micro, tokenizer = load_checkpoint(trained_micro)
    hf_dir = tmp_path / "hf"
    lm.save_hf(micro.lm, hf_dir)
    (hf_dir / "tokenizer.json").write_bytes((trained_micro / "tokenizer.json").read_bytes())
    rc = main(["finetune", "--from", str(hf_dir), "--vision", "test_resnet", "--image-size", "64",
               "--freeze", "lm"] + short_run(synth_shards, tmp_path / "run"))
    assert rc == 0
    after = final_weights(tmp_path / "run")
    source = {f"lm.{k}": v for k, v in micro.lm.state_dict().items()}  # weights and router biases
    assert not any(changed(source, after, "lm."))  # the LM loaded from HF and stayed frozen
    assert any(k.startswith("vision.") for k in after) and any(k.startswith("projector.") for k in after)
    model, _ = load_checkpoint(sorted((tmp_path / "run" / "checkpoints").iterdir())[-1])
    assert model.cfg.vision.model_name == "test_resnet" and model.num_image_tokens == 4


def test_a_source_that_is_neither_kind_is_named(tmp_path, synth_shards, capsys):
    rc = main(["finetune", "--from", str(tmp_path)] + short_run(synth_shards, tmp_path / "run"))
    assert rc == 2
    assert "neither a Captioner checkpoint nor an HF model directory" in capsys.readouterr().err


def test_mtp_stage_trains_the_chain_and_leaves_the_captions(trained_micro, synth_shards, tmp_path, monkeypatch):
    """--stage mtp --mtp-depths 3: only MTP weights move (encoder statistics included), the
    config records the depth, greedy output is unchanged and speculation drafts 3 by default."""
    from mm.captioner import Captioner
    from train.data.scenes import render, sample_rng, sample_scene

    rc = main(["finetune", "--from", str(trained_micro), "--stage", "mtp", "--mtp-depths", "3"]
              + short_run(synth_shards, tmp_path / "run"))
    assert rc == 0
    before, after = load_file(str(trained_micro / "model.safetensors")), final_weights(tmp_path / "run")
    assert any(changed(before, after, "lm.mtp."))
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert all(k.startswith("lm.mtp.") for k in moved), moved
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    old, new = Captioner.from_pretrained(trained_micro), Captioner.from_pretrained(ckpt)
    assert new.model.cfg.lm.mtp_depths == 3 and old.model.cfg.lm.mtp_depths == 0
    images = [render(sample_scene(sample_rng("test", 5, i))) for i in range(3)]
    assert new.caption(images, task="describe") == old.caption(images, task="describe")
    import mm.generate

    monkeypatch.setattr(mm.generate, "DRAFT_MIN_PROB", 0.0)  # every round drafts the whole chain
    new.draft_policy = None  # every request drafts
    by_default = new.run(images[0], task="describe", speculative=True)
    explicit = new.run(images[0], task="describe", speculative=True, draft_tokens=3)
    assert by_default.texts == explicit.texts == new.caption(images[:1], task="describe")
    assert (by_default.stats.drafts, by_default.stats.accepted) == (explicit.stats.drafts, explicit.stats.accepted)
    assert by_default.stats.drafts % 3 == 0 and by_default.stats.drafts > 0


def test_mtp_depths_and_the_mtp_stage_need_an_mtp_module():
    from mm.config import preset
    from mm.model import CaptionModel
    from train.finetune import set_mtp_depths, set_stage

    cfg = preset("tiny")
    model = CaptionModel(cfg.replace(lm=cfg.lm.replace(num_nextn_predict_layers=0)), image_token_id=3)
    with pytest.raises(ValueError, match="the model has no MTP module"):
        set_mtp_depths(model, 2)
    with pytest.raises(ValueError, match="--stage mtp: the model has no MTP module to train"):
        set_stage(model, "mtp", [], 0)
    model = CaptionModel(cfg, image_token_id=3)
    set_mtp_depths(model, 4)
    assert model.cfg.lm.mtp_depths == model.lm.cfg.mtp_depths == 4 and cfg.lm.mtp_depths == 0
