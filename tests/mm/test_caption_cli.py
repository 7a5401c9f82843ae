"""`mm caption` over a folder with a corrupt file and an RGBA PNG, and over shards."""

import json

from PIL import Image

from mm.cli import main
from train.scenes import render, sample_rng, sample_scene


def test_folder_with_a_corrupt_file(trained_micro, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    render(sample_scene(sample_rng("test", 1, 0))).save(folder / "scene.png")
    rgba = render(sample_scene(sample_rng("test", 1, 1))).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(folder / "alpha.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    out = tmp_path / "out.jsonl"
    rc = main(["caption", str(folder), "--checkpoint", str(trained_micro), "--out", str(out),
               "--batch-size", "2", "--task", "describe"])
    err = capsys.readouterr().err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert rc == 1
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in lines) == ["alpha.png", "scene.png"]
    assert all(r["task"] == "describe" and isinstance(r["caption"], str) for r in lines)
    assert "corrupt.jpg" in err and "1 failed" in err


def test_shards_and_globs(trained_micro, synth_shards, tmp_path, capsys):
    Image.new("RGB", (40, 30), "white").save(tmp_path / "w.png")
    rc = main(["caption", synth_shards["test"], str(tmp_path / "*.png"), "--checkpoint", str(trained_micro)])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0
    assert len([r for r in lines if "key" in r]) == 32
    assert [r["path"] for r in lines if "path" in r] == [str(tmp_path / "w.png")]


def test_unknown_task_fails_before_work(trained_micro, tmp_path, capsys):
    rc = main(["caption", str(tmp_path), "--checkpoint", str(trained_micro), "--task", "haiku"])
    assert rc == 2
    assert "unknown task 'haiku'" in capsys.readouterr().err


def test_bad_decoding_options_fail_before_work(trained_micro, tmp_path, capsys):
    rc = main(["caption", str(tmp_path), "--checkpoint", str(trained_micro), "--draft-tokens", "0"])
    assert rc == 2
    assert "draft_tokens must be in 1..8, got 0" in capsys.readouterr().err
