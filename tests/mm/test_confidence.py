"""Confidence and familiarity (mm/confidence.py): one score however the caption was decoded, a
calibration that round-trips through a checkpoint, and unfamiliar images flagged by it."""

import pytest
import torch

from lm.config import CheckpointError
from mm.captioner import Captioner
from mm.checkpoint import load_checkpoint, save_checkpoint
from mm.confidence import Calibration, chosen_logprob, confidence, fit
from mm.engine import Engine
from train.data.scenes import render, sample_rng, sample_scene


@pytest.fixture(scope="module")
def cap():
    return Captioner.from_pretrained()


def _scenes(n, start=0):
    return [render(sample_scene(sample_rng("test", 0, start + i))) for i in range(n)]


def test_chosen_logprob_is_the_log_softmax_of_the_chosen_token():
    logits = torch.randn(3, 7)
    tokens = torch.tensor([0, 6, 2])
    ref = torch.stack([torch.log_softmax(logits[i], -1)[t] for i, t in enumerate(tokens)])
    torch.testing.assert_close(chosen_logprob(logits, tokens), ref)
    assert confidence(torch.tensor([0.0]), None).item() == 1.0
    assert confidence(torch.tensor([0.0]), torch.tensor([0.25])).item() == 0.25


def test_confidence_is_the_same_however_the_caption_is_decoded(cap):
    images = _scenes(4)
    plain = cap.run(images, speculative=False)
    assert len(plain.confidence) == 4 and all(0.9 < c <= 1.0 for c in plain.confidence)
    for other in (cap.run(images, speculative=True, draft_tokens=2), cap.run(images, num_beams=3)):
        assert other.texts == plain.texts
        torch.testing.assert_close(torch.tensor(other.confidence), torch.tensor(plain.confidence), rtol=0, atol=1e-5)
    engine = Engine(cap, max_batch=4)
    try:
        served = [engine.submit(im).result().stats.confidence[0] for im in images]
    finally:
        engine.close()
    torch.testing.assert_close(torch.tensor(served), torch.tensor(plain.confidence), rtol=0, atol=1e-5)
    # a caption the model is unsure of scores lower: sampling at a high temperature writes such text
    hot = cap.run(images, temperature=3.0, seed=0)
    assert sum(hot.confidence) < sum(plain.confidence)


def test_calibration_fits_distances_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4000, 16, generator=g) * torch.linspace(0.5, 3, 16) + 2.0
    mean, whiten = fit(feats, shrinkage=0.0)
    cal = Calibration(mean, whiten, radius=8.0, softness=0.6, thresholds={"caption": 0.5, "describe": 0.4},
                      info={"n": 4000})
    assert cal.threshold("describe") == 0.4 and cal.threshold("new_task") == 0.4  # unseen: the most lenient
    inside = cal.distance(feats[:500, None])  # [B, N=1, C]
    assert 3.3 < inside.mean() < 4.7  # a 16-d standard normal's length is ~4
    far = cal.distance((feats[:10] + 30.0)[:, None])
    assert (far > 15).all()
    fam = cal.familiarity(torch.cat([feats[:10], feats[:10] + 30.0])[:, None])
    assert (fam[:10] > 0.9).all() and (fam[10:] < 0.01).all()
    cal.save(tmp_path)
    back = Calibration.load(tmp_path)
    assert torch.equal(back.mean, cal.mean) and torch.equal(back.whiten, cal.whiten)
    assert (back.radius, back.softness, back.thresholds, back.info) == (8.0, 0.6, cal.thresholds, {"n": 4000})
    assert Calibration.load(tmp_path / "missing") is None


def test_a_calibrated_checkpoint_flags_unfamiliar_images(cap, tmp_path):
    model = cap.model
    feats = model.vision(cap.pixels(_scenes(64, 100))).float().mean(1)
    mean, whiten = fit(feats)
    model.calibration = Calibration(mean, whiten, radius=100.0, softness=10.0, thresholds={"caption": 0.5}, info={})
    try:
        save_checkpoint(tmp_path / "ckpt", model, cap.tokenizer)
    finally:
        model.calibration = None
    assert (tmp_path / "ckpt" / "calibration.safetensors").is_file()
    calibrated = Captioner.from_pretrained(tmp_path / "ckpt")
    assert calibrated.threshold("caption") == 0.5
    res = calibrated.run(_scenes(2))
    assert res.unfamiliar == [False, False] and all(c > 0.9 for c in res.confidence)
    # far from every fitted scene: an image of pure noise
    noise = torch.randint(0, 256, (96, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    from PIL import Image

    odd = calibrated.run(Image.fromarray(noise.numpy()))
    assert odd.unfamiliar == [True] and odd.confidence[0] < 0.5
    assert cap.threshold() is None and cap.run(_scenes(1)).unfamiliar == [False]  # uncalibrated: nothing flagged
    (tmp_path / "ckpt" / "calibration.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="calibration.safetensors"):
        load_checkpoint(tmp_path / "ckpt")
