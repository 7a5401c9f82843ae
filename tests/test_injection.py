"""Nothing a user hands the product reaches a shell or an interpreter.

Two holes are closed here and kept closed: a file name that webdataset would run as a
`pipe:` shell command (`mm caption *` in a folder holding `pipe:touch PWNED;x.tar`),
and image bytes that PIL's EPS plugin would give to Ghostscript (request bytes on the
HTTP route, uploads on the page, files for `mm caption` and the shard writer, shard
members for the training reader). Each test first shows that its sensor sees the
thing happen when the guard is bypassed, so it cannot pass by not looking.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import EpsImagePlugin, Image

from mm.cli import main
from mm.samples import BadSample, DataErrors, open_shard, sample_image, shard_samples
from vision.preprocess import IMAGE_FORMATS, ImageError, load_image

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\n%%EOF\n"


@pytest.fixture
def ghostscript_runs(monkeypatch) -> list:
    """Every call PIL makes to Ghostscript, recorded (and refused, so nothing runs)."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        raise OSError("Ghostscript was called")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", fake)
    return calls


def test_the_sensor_sees_pil_hand_eps_to_ghostscript(ghostscript_runs):
    with pytest.raises(OSError, match="Ghostscript was called"):
        Image.open(io.BytesIO(EPS)).load()  # PIL without an allow-list
    assert len(ghostscript_runs) == 1


@pytest.mark.parametrize("as_", ["bytes", "path named .png", "file object"])
def test_load_image_refuses_eps_by_content(ghostscript_runs, tmp_path, as_):
    path = tmp_path / "photo.png"
    path.write_bytes(EPS)
    source = {"bytes": EPS, "path named .png": str(path), "file object": io.BytesIO(EPS)}[as_]
    with pytest.raises(ImageError, match="supported format") as e:
        load_image(source)
    assert ghostscript_runs == []
    assert "EPS" not in IMAGE_FORMATS and "PNG" in str(e.value)


def test_shard_member_with_eps_bytes_is_a_bad_image(ghostscript_runs):
    with pytest.raises(BadSample) as e:
        sample_image({"__key__": "k", "png": EPS})
    assert e.value.reason == "bad_image" and ghostscript_runs == []


def test_shard_writer_skips_eps(ghostscript_runs, tmp_path):
    from train.data.shards import _image_entry

    (tmp_path / "a.jpg").write_bytes(EPS)
    with pytest.raises(OSError):
        _image_entry(str(tmp_path / "a.jpg"), None)
    assert ghostscript_runs == []


def test_page_upload_of_eps_is_a_message(ghostscript_runs, tmp_path):
    import gradio as gr
    from gradio.data_classes import FileData

    import app

    path = tmp_path / "upload.png"
    path.write_bytes(EPS)
    widget = app.ImageInput(type="filepath")
    with pytest.raises(gr.Error) as e:
        widget.preprocess(FileData(path=str(path), orig_name="holiday.png"))
    assert "holiday.png" in e.value.message and str(tmp_path) not in e.value.message
    with pytest.raises(gr.Error):
        app.open_image(str(path))
    assert ghostscript_runs == []


# --- shell commands in shard names --------------------------------------------------------

def test_the_sensor_sees_an_allowed_pipe_run(tmp_path):
    marker = tmp_path / "RAN"
    errors = DataErrors()
    assert list(shard_samples(f"pipe:touch {marker}", errors, allow_pipe=True)) == []
    assert marker.exists()


def test_pipe_urls_are_refused_without_the_opt_in(tmp_path):
    marker = tmp_path / "RAN"
    errors = DataErrors()
    assert list(shard_samples(f"pipe:touch {marker}", errors)) == []
    assert not marker.exists()
    assert errors.counts["bad_shard"] == 1 and "allow_pipe" in errors.examples[0]["detail"]
    with pytest.raises(ValueError, match="shell command"):
        open_shard(f"pipe:touch {marker}")


def test_an_existing_file_is_a_file_whatever_its_name(tmp_path):
    odd = tmp_path / "pipe:touch x;y::{0..1}.tar"
    odd.write_bytes(b"")
    with open_shard(str(odd)) as f:
        assert f.read() == b""


def test_mm_caption_star_in_a_folder_with_a_pipe_named_file(trained_micro, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "pipe:touch PWNED;x.tar").write_bytes(b"not a tar")
    Image.new("RGB", (32, 32), "white").save(folder / "ok.png")
    monkeypatch.chdir(folder)
    star = sorted(os.listdir("."))  # what the shell makes of `mm caption *`
    out = tmp_path / "out.jsonl"
    rc = main(["caption", *star, "pipe:touch PWNED2;y.tar", "--checkpoint", str(trained_micro),
               "--out", str(out), "--no-speculative", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert not Path("PWNED").exists() and not Path("PWNED2").exists()
    assert rc == 2, err  # the odd file is read as a (broken) shard, the pipe: argument is refused
    assert out.read_text().count("\n") == 1 and "ok.png" in out.read_text()
    assert "shell command" in err


def test_training_reader_refuses_a_pipe_shard(tmp_path):
    from train.data.reader import make_loader

    marker = tmp_path / "RAN"
    loader = make_loader([f"pipe:touch {marker}"], encode=lambda task, text: None, image_transform=lambda x: x,
                         batch_size=1, shuffle=0)
    assert list(loader) == []
    assert not marker.exists() and loader.errors.counts["bad_shard"] == 1
