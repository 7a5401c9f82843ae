"""The Captioner API: inputs of every kind, save/load round trip, streaming, clear errors."""

import io
import json
import shutil

import pytest
from PIL import Image

from mm.captioner import Captioner
from mm.checkpoint import CheckpointError
from train.data.scenes import render, sample_rng, sample_scene
from vision.preprocess import ImageError


@pytest.fixture(scope="module")
def cap(trained_micro):
    return Captioner.from_pretrained(trained_micro, device="cpu")


@pytest.fixture(scope="module")
def scenes():
    return [render(sample_scene(sample_rng("test", 9, i))) for i in range(3)]


def test_inputs_pil_path_bytes_agree(cap, scenes, tmp_path):
    img = scenes[0]
    path = tmp_path / "a.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    a = cap.caption(img)
    assert isinstance(a, str)
    assert cap.caption(str(path)) == a == cap.caption(buf.getvalue()) == cap.caption(path)
    assert cap.caption([img, img]) == [a, a]


def test_save_then_load_gives_identical_captions(cap, scenes, tmp_path):
    out = cap.save_pretrained(tmp_path / "saved")
    again = Captioner.from_pretrained(out)
    for task in cap.tasks:
        assert again.caption(scenes, task=task) == cap.caption(scenes, task=task)


def test_stream_pieces_join_to_the_caption(cap, scenes):
    for task in ("caption", "describe_zh"):
        pieces = list(cap.stream(scenes[1], task=task, max_new_tokens=30))
        assert "".join(pieces) == cap.caption(scenes[1], task=task, max_new_tokens=30)


def test_batch_size_does_not_change_results(cap, scenes):
    small = Captioner(cap.model, cap.tokenizer, batch_size=1)
    assert small.caption(scenes, task="describe") == cap.caption(scenes, task="describe")


def test_unknown_task_names_the_known_ones(cap, scenes):
    with pytest.raises(ValueError, match="unknown task 'poem'.*caption"):
        cap.caption(scenes[0], task="poem")


def test_empty_list_and_unknown_option(cap):
    with pytest.raises(ValueError, match="no images"):
        cap.caption([])
    with pytest.raises(TypeError, match="beam_width"):
        cap.caption(Image.new("RGB", (8, 8)), beam_width=3)


def test_bad_images_are_named(cap, tmp_path):
    with pytest.raises(ImageError, match="bytes of length 9"):
        cap.caption(b"not a png")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(ImageError, match="broken.jpg"):
        cap.caption(str(bad))
    with pytest.raises(ImageError):
        cap.caption(Image.new("RGB", (0, 0)))


def test_decompression_bomb_is_refused(tmp_path):
    from vision.preprocess import load_image

    big = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(big)
    with pytest.raises(ImageError, match="pixels"):
        load_image(str(big), max_pixels=1_000_000)


def test_checkpoint_missing_file_or_mismatched_config(trained_micro, tmp_path):
    broken = tmp_path / "no_weights"
    shutil.copytree(trained_micro, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Captioner.from_pretrained(broken)
    mismatched = tmp_path / "mismatch"
    shutil.copytree(trained_micro, mismatched)
    cfg = json.loads((mismatched / "config.json").read_text())
    cfg["lm"]["hidden_size"] = 96
    (mismatched / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        Captioner.from_pretrained(mismatched)
    with pytest.raises(CheckpointError, match="does not exist"):
        Captioner.from_pretrained(tmp_path / "nowhere")
