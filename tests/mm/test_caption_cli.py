"""`mm caption` over a folder with a corrupt file and an RGBA PNG, over shards (also missing or cut
ones), and with bad options, a damaged checkpoint or a reader that goes away."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mm.cli import main
from train.data.scenes import render, sample_rng, sample_scene


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
    assert all(0 <= r["confidence"] <= 1 and r["unfamiliar"] is False for r in lines)  # uncalibrated model
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


def _two_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        render(sample_scene(sample_rng("test", 2, i))).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("args, named", [(["--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
                                         (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
                                         (["--device", "tpu"], "device 'tpu'"),
                                         (["--device", "cuda:99"], "device 'cuda:99' is not available"),
                                         (["--temperature", "nan"], "temperature must be a finite number"),
                                         (["--num-beams", "1000"], "num_beams must be in 1..16")])
def test_bad_options_exit_2_and_write_nothing(trained_micro, tmp_path, capsys, args, named):
    out = tmp_path / "out.jsonl"
    rc = main(["caption", str(_two_images(tmp_path)), "--checkpoint", str(trained_micro), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and named in err and "Traceback" not in err
    assert not out.exists()


def test_missing_and_truncated_shards_are_failures(trained_micro, synth_shards, tmp_path, capsys):
    truncated = tmp_path / "cut.tar"
    data = open(synth_shards["test"], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    missing = tmp_path / "nope-000000.tar"
    rc = main(["caption", str(missing), str(truncated), "--checkpoint", str(trained_micro)])
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.splitlines()]
    assert 0 < len(lines) < 32  # the samples before the break are captioned
    assert f"skipped {missing}: shard cannot be read (FileNotFoundError" in captured.err
    assert f"skipped {truncated}: shard broken after member " in captured.err
    assert "the rest of it is lost" in captured.err and f"{len(lines)} captioned, 2 failed" in captured.err
    assert rc == 2


def test_closed_stdout_ends_quietly(trained_micro, tmp_path):
    """`mm caption ... | head -1`: the reader goes away after one line; no traceback, status 141."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (24, 24), (40 * i, 0, 0)).save(folder / f"{i}.png")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mm.cli", "caption", str(folder), "--checkpoint",
                             str(trained_micro), "--batch-size", "1", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert json.loads(first)["path"].endswith("0.png")
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


@pytest.mark.parametrize("damage", [b"", b"truncated"])
def test_damaged_weights_exit_2_in_every_command(trained_micro, synth_shards, tmp_path, capsys, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_micro, ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000] if damage else b"")
    commands = [["caption", str(_two_images(tmp_path)), "--checkpoint", str(ckpt)],
                ["eval", "--checkpoint", str(ckpt), "--data", synth_shards["test"]],
                ["finetune", "--from", str(ckpt), "--data", synth_shards["train"], "--out", str(tmp_path / "ft")]]
    for command in commands:
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert f"{weights}: not a readable safetensors file" in err and "Traceback" not in err, (command, err)
    import app

    assert app.main(["--checkpoint", str(ckpt), "--device", "cpu"]) == 2  # the app does not start
    assert f"{weights}: not a readable safetensors file" in capsys.readouterr().err
