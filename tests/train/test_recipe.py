"""The default-model recipe cannot rot silently: a short retraining must still learn.

Slow (a few minutes on 2 CPU cores): run with `make test-slow` or `pytest -m slow`.
"""

import json
import re
from pathlib import Path

import pytest

from train.config import load_train_config
from train.data.shards import write_synthetic
from train.trainer import train

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "shapes-tiny.json"
START_LOSS = 5.0  # a fresh model's main loss is about ln(vocab) ~ 6
WARMUP_SHAPE_ACC = 0.9  # the full recipe's warm-up ends at 0.993
TARGET_LOSS = 1.5  # the full recipe (after its encoder warm-up) logs 1.71 at step 75, 0.18 at 600, 2e-4 at 2000


@pytest.mark.slow
def test_short_recipe_run_learns(tmp_path, capsys):
    write_synthetic(str(tmp_path / "data"), 4000, seed=0, split="train", per_shard=500)
    cfg = load_train_config(str(RECIPE), [
        f"--data.train={tmp_path}/data/train-{{000000..000007}}.tar", "--data.val=", "--eval_every=0",
        "--optim.max_steps=150", "--optim.warmup_steps=50", f"--out_dir={tmp_path}/run", "--save_every=150",
        "--log_every=1", "--tokenizer_samples=4000",
    ])
    train(cfg)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss_main"] > START_LOSS
    last = [r["loss_main"] for r in records[-10:]]
    assert sum(last) / len(last) < TARGET_LOSS, last
    # the encoder warm-up ran first and taught the encoder shapes
    warmup = re.search(r"vision warm-up: shape_acc ([0-9.]+)", capsys.readouterr().out)
    assert warmup and float(warmup.group(1)) > WARMUP_SHAPE_ACC, warmup
