"""Image changes (train/data/augment.py): each op does what it says, augmentation is seeded and keeps a
scene's objects in the frame, and the training reader applies it reproducibly."""

import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from lm.config import ConfigError
from train.config import AugmentConfig, load_train_config
from train.data import augment as A
from train.data.scenes import BACKGROUNDS, render, sample_rng, sample_scene


def _scene(i=0):
    return render(sample_scene(sample_rng("test", 0, i)))


def test_shift_moves_content_and_fills_with_the_background():
    img = _scene(3)
    moved = A.shift(img, 5, -7)
    a, b = np.asarray(img), np.asarray(moved)
    assert np.array_equal(b[0:121, 5:], a[7:128, :123])  # pixel (x, y) is now at (x + 5, y - 7)
    assert (b[:, :5] == a[0, 0]).all() and (b[121:] == a[0, 0]).all()  # uncovered: the background


def test_canvas_places_the_image_and_pads_with_its_border_colour():
    img = _scene(1)
    wide = A.centred_canvas(img, 4 / 3)
    assert wide.size == (171, 128)
    arr = np.asarray(wide)
    assert np.array_equal(arr[:, 21:149], np.asarray(img))
    assert (arr[:, :21] == np.asarray(img)[0, 0]).all()
    assert A.centred_canvas(img, 3 / 4).size == (128, 171)
    assert A.canvas_size(100, 50, 1.0) == (100, 50)  # already wider than asked: unchanged


def test_pixel_ops_are_seeded_and_bounded():
    img = _scene(2)
    assert A.rescale(img, 64).size == (64, 64) and A.rescale(A.centred_canvas(img, 4 / 3), 64).size == (64, 48)
    a, b = A.noise(img, 8.0, random.Random(1)), A.noise(img, 8.0, random.Random(1))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    gray = Image.new("RGB", (64, 64), (128, 128, 128))  # mid-grey: no clipping
    diff = np.asarray(A.noise(gray, 8.0, random.Random(2)), dtype=np.float32) - 128
    assert 7.5 < diff.std() < 8.5 and abs(diff.mean()) < 0.5
    jpg = np.asarray(A.jpeg(img, 40), dtype=np.float32)
    assert 0 < np.abs(jpg - np.asarray(img, dtype=np.float32)).mean() < 10  # lossy, close
    assert A.CHANGES["none"](img) is img and set(A.CHANGES) >= {"jpeg40", "down64", "noise8", "shift8", "canvas4:3"}


def test_augment_is_reproducible_and_keeps_the_scene_visible():
    cfg = AugmentConfig(enabled=True, p=1.0)
    aug = pickle.loads(pickle.dumps(A.Augment(cfg)))  # runs in loader workers
    outs = []
    for i in range(40):
        img = _scene(i)
        x, y = aug(img, random.Random(i)), aug(img, random.Random(i))
        assert np.array_equal(np.asarray(x), np.asarray(y))
        outs.append(x)
        assert 56 <= max(x.size) <= 512 * 1.4 + 1
    assert len({o.size for o in outs}) > 10  # sizes and shapes vary
    assert A.Augment(AugmentConfig(enabled=True, p=0.0))(_scene(0), random.Random(0)) is not None
    clean = _scene(0)
    assert A.Augment(AugmentConfig(enabled=True, p=0.0))(clean, random.Random(0)) is clean
    flat = A.Augment(cfg, geometric=False)(clean, random.Random(5))
    assert flat.width == flat.height  # no canvas, no shift: only pixel-level changes and a rescale


def test_augment_keeps_background_colour_names_true():
    """Brightness/contrast within +-10% keep the three backgrounds far apart."""
    for name, rgb in BACKGROUNDS.items():
        img = Image.new("RGB", (32, 32), rgb)
        for b in (0.9, 1.1):
            for c in (0.9, 1.1):
                out = np.asarray(A.tone(img, b, c), dtype=np.float32).mean()
                nearest = min(BACKGROUNDS, key=lambda k: abs(np.mean(BACKGROUNDS[k]) - out))
                assert nearest == name


def test_augment_config_is_checked_and_on_only_where_asked():
    assert not AugmentConfig().enabled
    with pytest.raises(ConfigError, match="chances must be in"):
        AugmentConfig(jpeg=1.5)
    with pytest.raises(ConfigError, match="jpeg_quality"):
        AugmentConfig(jpeg_quality=[50, 120])
    with pytest.raises(ConfigError, match="scale_px"):
        AugmentConfig(scale_px=[100, 50])
    cfg = load_train_config(None, ["--augment.enabled=true", "--augment.noise=0.5"])
    assert cfg.augment.enabled and cfg.augment.noise == 0.5


def test_loader_applies_augmentation_reproducibly(tmp_path):
    from train.data.reader import make_loader
    from train.data.shards import write_synthetic
    from vision.preprocess import build_transform

    write_synthetic(str(tmp_path), 64, seed=0, split="train", per_shard=32)
    urls = f"{tmp_path}/train-{{000000..000001}}.tar"
    tf = build_transform(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)

    def images(augment, epoch=0):
        loader = make_loader(urls, encode=lambda task, text: ([1, 2], [1, 2]), image_transform=tf, batch_size=8,
                             shuffle=0, augment=augment, epoch=epoch, seed=3)
        return torch.cat([b["images"] for b in loader])

    aug = A.Augment(AugmentConfig(enabled=True, p=1.0))
    clean, once, again = images(None), images(aug), images(aug)
    assert torch.equal(once, again)
    assert not torch.equal(clean, once)
    assert not torch.equal(once, images(aug, epoch=1))  # a new epoch draws new changes
