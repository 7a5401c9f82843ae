"""Configs round-trip through JSON exactly and reject unknown or mistyped keys by name."""

import json

import pytest

from lm.config import ConfigError, LMConfig
from mm.config import PRESETS, MMConfig, preset
from train.config import TrainConfig, apply_overrides, load_train_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_exactly(name):
    cfg = preset(name)
    again = MMConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_train_config_round_trip(tmp_path):
    cfg = TrainConfig()
    path = tmp_path / "train.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert load_train_config(str(path)) == cfg


def test_unknown_key_is_named():
    data = preset("tiny").to_dict()
    data["lm"]["kv_lora_rnak"] = 64
    with pytest.raises(ConfigError, match=r"MMConfig\.lm.*kv_lora_rnak"):
        MMConfig.from_dict(data)


def test_mistyped_value_is_named():
    with pytest.raises(ConfigError, match="hidden_size"):
        LMConfig.from_dict({"hidden_size": "big"})
    with pytest.raises(ConfigError, match="norm_topk_prob"):
        LMConfig.from_dict({"norm_topk_prob": 1})


def test_overrides_are_checked(tmp_path):
    cfg = load_train_config(None, ["--optim.lr=0.003", "--model.lm.num_hidden_layers=2"])
    assert cfg.optim.lr == 0.003 and cfg.model.lm.num_hidden_layers == 2
    with pytest.raises(ConfigError, match="lrr"):
        load_train_config(None, ["--optim.lrr=1"])
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides({}, ["optim.lr"])


def test_bad_choice_is_named():
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig.from_dict({"precision": "fp4"})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="huge"):
        preset("huge")


@pytest.mark.parametrize("override, named", [
    ("--optim.lr=NaN", "optim.lr: expected a finite number"), ("--optim.grad_accum=0", "grad_accum must be >= 1"),
    ("--optim.batch_size=0", "batch_size must be >= 1"), ('--data.tasks=["poem"]', "data.tasks must be tasks"),
    ("--save_every=0", "save_every must be >= 1"), ("--data.train=nope-{0..3}.tar", "none of the 4 shards exists"),
    ("--data.train=", "data.train is empty"), ("--tokenizer=nope.json", "tokenizer: nope.json does not exist"),
])
def test_mm_train_refuses_bad_configs_before_any_work(tmp_path, capsys, override, named):
    from mm.cli import main

    out = tmp_path / "run"
    shards = tmp_path / "s-000000.tar"
    shards.write_bytes(b"")  # exists; never read, as the run must stop before reading anything
    assert main(["train", f"--data.train={shards}", "--out", str(out), override]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not out.exists()


def test_mm_train_names_a_malformed_tokenizer_file(tmp_path, capsys):
    from mm.cli import main

    bad = tmp_path / "tok.json"
    bad.write_text("{nope")
    shards = tmp_path / "s-000000.tar"
    shards.write_bytes(b"")
    assert main(["train", f"--data.train={shards}", "--out", str(tmp_path / "run"), f"--tokenizer={bad}"]) == 2
    assert f"tokenizer: {bad}: not a tokenizers tokenizer.json" in capsys.readouterr().err
