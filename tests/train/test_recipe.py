"""The default-model recipe cannot rot silently: a short retraining must still learn.

Slow (a few minutes on 2 CPU cores): run with `make test-slow` or `pytest -m slow`.
"""

import json
from pathlib import Path

import pytest

from train.config import load_train_config
from train.shards import write_synthetic
from train.trainer import train

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "shapes-tiny.json"
START_LOSS = 5.0  # a fresh model's main loss is about ln(vocab) ~ 6
TARGET_LOSS = 1.5  # the full recipe (after its encoder warm-up) logs 1.71 at step 75, 0.18 at 600, 2e-4 at 2000


@pytest.mark.slow
def test_short_recipe_run_learns(tmp_path):
    write_synthetic(str(tmp_path / "data"), 4000, seed=0, split="train", per_shard=500)
    cfg = load_train_config(str(RECIPE), [
        f"--data.train={tmp_path}/data/train-{{000000..000007}}.tar", "--data.val=", "--eval_every=0",
        "--optim.max_steps=150", "--optim.warmup_steps=50", f"--out_dir={tmp_path}/run", "--save_every=150",
        "--tokenizer_samples=4000",
    ])
    train(cfg)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss_main"] > START_LOSS
    assert records[-1]["loss_main"] < TARGET_LOSS, records[-1]
