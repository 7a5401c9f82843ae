"""The encoder warm-up: labels follow the scenes, cells are pooled right, it learns, and a
resumed run does not repeat it."""

import sys
from pathlib import Path

import pytest
import torch

from lm.config import ConfigError
from train import trainer as T
from train import vision_warmup as W
from train.config import VisionWarmupConfig
from train.data.scenes import render, sample_rng, sample_scene
from vision.encoder import VisionEncoder
from vision.preprocess import build_transform

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for conftest helpers
from conftest import micro_train_config  # noqa: E402


def test_labels_name_each_cell_of_each_scene():
    transform = build_transform(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    images, labels = W.scene_batch(100, 12, 3, transform)
    assert images.shape == (12, 3, 32, 32)
    for i in range(12):
        scene = sample_scene(sample_rng("train", 3, 100 + i))
        torch.testing.assert_close(images[i], transform(render(scene)))
        cells = {o.cell: o for o in scene.objects}
        for name, values in W.ATTRIBUTES.items():
            want = [1 + values.index(getattr(cells[c], name)) if c in cells else 0 for c in range(9)]
            assert labels[name][i].tolist() == want


class GridEncoder(torch.nn.Module):
    """Stands in for a VisionEncoder: returns the images' pixels as tokens on a (h, w) grid."""

    def __init__(self, grid):
        super().__init__()
        self.grid = grid

    def forward(self, images):
        return images.flatten(2).transpose(1, 2)  # [B, h*w, C]


def test_cell_features_average_each_third_of_the_token_grid():
    x = torch.arange(2 * 3 * 36, dtype=torch.float32).reshape(2, 3, 6, 6)
    out = W.cell_features(GridEncoder((6, 6)), x)
    assert out.shape == (2, 9, 3)
    for cell in range(9):
        r, c = divmod(cell, 3)
        torch.testing.assert_close(out[:, cell], x[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean((2, 3)))
    same = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(W.cell_features(GridEncoder((3, 3)), same), same.flatten(2).transpose(1, 2))


def test_warm_up_trains_the_encoder_to_read_colour():
    torch.manual_seed(0)
    enc = VisionEncoder("test_resnet", image_size=96)  # a 3x3 token grid
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    transform = build_transform(enc.data_config)
    acc = W.warm_up_vision(enc, transform, steps=40, lr=3e-3, batch_size=32, weight_decay=0.0, seed=0,
                           channels_last=False, show_progress=False, say=lambda m: None)
    assert set(acc) == {"shape_acc", "colour_acc", "size_acc"}
    assert acc["colour_acc"] > 0.5, acc  # chance is 1/6
    assert any(not torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert not any("head" in k for k in enc.state_dict() if k not in before)  # the heads are not kept


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="vision_warmup"):
        VisionWarmupConfig(steps=-1)
    with pytest.raises(ValueError, match="steps > 0"):
        W.warm_up_vision(GridEncoder((3, 3)), None, steps=0, lr=1e-3, batch_size=1, weight_decay=0, seed=0)


def test_a_fresh_run_warms_up_once_and_a_resumed_run_not_again(synth_shards, tmp_path, monkeypatch):
    calls = []
    real = W.warm_up_vision
    monkeypatch.setattr(W, "warm_up_vision", lambda *a, **k: calls.append(k["steps"]) or real(*a, **k))
    cfg = micro_train_config(synth_shards, tmp_path, save_every=2,
                             vision_warmup=VisionWarmupConfig(steps=2, batch_size=8))
    T.train(cfg.replace(optim=cfg.optim.replace(max_steps=2)))
    assert calls == [2]
    T.train(cfg.replace(optim=cfg.optim.replace(max_steps=4)), resume="auto")
    assert calls == [2]
