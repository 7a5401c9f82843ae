"""The bundled model learns a new task, `count` ("three shapes" / "三个图形"), with LoRA only
(configs/shapes-tiny-lora-count.json): exact match >= 0.95 on the test scenes in both languages,
the four tasks it knew keep >= 0.99, and fewer than 5% of the parameters train.
About 15-20 minutes on one CPU thread: marked slow."""

from pathlib import Path

import pytest

from mm.captioner import DEFAULT_MODEL_DIR, Captioner
from mm.checkpoint import load_checkpoint
from mm.cli import main
from train.config import load_train_config
from train.data.shards import write_synthetic
from train.eval.scorer import read_samples, score_captions
from train.finetune import set_stage
from train.lora import apply_lora

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "shapes-tiny-lora-count.json"
KNOWN = ["caption", "describe", "caption_zh", "describe_zh"]


@pytest.mark.slow
def test_lora_teaches_the_bundled_model_to_count(tmp_path):
    data = tmp_path / "count"
    write_synthetic(str(data), 20000, seed=0, split="train")
    write_synthetic(str(data), 1000, seed=0, split="test")
    rc = main(["finetune", "--from", str(DEFAULT_MODEL_DIR), "--stage", "lora", "--config", str(RECIPE),
               "--data", str(data / "train-{000000..000019}.tar"), "--out", str(tmp_path / "run"),
               "--export", str(tmp_path / "export")])
    assert rc == 0
    cap = Captioner.from_pretrained(tmp_path / "export")
    tasks = KNOWN + ["count", "count_zh"]
    scores = score_captions(cap, read_samples(str(data / "test-000000.tar"), 0, tasks), tasks, spec_samples=0)
    exact = {t: scores[t]["exact_match"] for t in tasks}
    assert all(exact[t] >= 0.95 for t in ("count", "count_zh")), exact
    assert all(exact[t] >= 0.99 for t in KNOWN), exact
    model, _ = load_checkpoint(DEFAULT_MODEL_DIR)
    lora = load_train_config(str(RECIPE)).lora
    set_stage(model, "lora", [], 0, lora)
    apply_lora(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < 0.05 * sum(p.numel() for p in model.parameters())
