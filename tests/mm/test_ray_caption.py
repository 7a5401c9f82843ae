"""`mm caption --ray` on a local 2-CPU Ray with 2 actors: the outputs of one process, a shard that
fails fails alone, and without Ray the option says how to install it. One Ray session per module."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from mm.captioner import Captioner
from mm.cli import main
from mm.samples import DataErrors, sample_image, shard_samples

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_actors_write_what_one_process_writes(local_ray, trained_micro, synth_shards, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in "abc":
        shutil.copy(synth_shards["test"], shards / f"{name}.tar")
    out = tmp_path / "out"
    (out / "c.jsonl.partial").mkdir(parents=True)  # c's output cannot be written: c fails, not the job
    rc = main(["caption", *(str(shards / f"{n}.tar") for n in "abc"), "--output-dir", str(out), "--ray",
               "--actors", "2", "--workers", "0", "--checkpoint", str(trained_micro), "--batch-size", "8"])
    err = capsys.readouterr().err
    assert rc == 1 and "c.tar: 0 captioned" in err and "FAILED: IsADirectoryError" in err
    cap = Captioner.from_pretrained(trained_micro, device="cpu")
    reference = {s["__key__"]: cap.caption(sample_image(s)) for s in shard_samples(synth_shards["test"], DataErrors())}
    for name in "ab":
        rows = [json.loads(x) for x in (out / f"{name}.jsonl").read_text().splitlines()]
        assert {r["key"]: r["caption"] for r in rows} == reference and len(rows) == len(reference)
    assert json.loads((out / "c.summary.json").read_text())["status"] == "failed"
    assert not (out / "c.jsonl").exists()

    rc = main(["caption", *(str(shards / f"{n}.tar") for n in "ab"), "--output-dir", str(out), "--ray",
               "--actors", "2", "--checkpoint", str(trained_micro)])
    assert rc == 0 and "0 units done, 0 failed, 2 already complete" in capsys.readouterr().err


def test_a_unit_that_raises_becomes_a_failed_summary(tmp_path):
    from mm.bulk_caption import BulkJob, Unit
    from mm.ray_caption import CaptionActor

    class Broken:
        transform = Captioner.from_pretrained().transform

        def run(self, *a, **k):
            raise RuntimeError("CUDA error: device-side assert")

    actor = CaptionActor.__new__(CaptionActor)
    img = tmp_path / "imgs" / "x.png"
    img.parent.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    actor.cap, actor.job = Broken(), BulkJob(str(tmp_path / "out"), "jsonl", "caption")
    (tmp_path / "out").mkdir()
    actor.units = [Unit("imgs", str(img.parent), (str(img),))]
    (summary,) = [json.loads(s) for s in actor({"unit": [0]})["summary"]]
    assert summary["status"] == "failed" and "RuntimeError: CUDA error" in summary["error"]
    assert not (tmp_path / "out" / "imgs.jsonl").exists()


def test_without_ray_the_option_says_how_to_install(synth_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    rc = main(["caption", synth_shards["test"], "--output-dir", str(tmp_path / "o"), "--ray"])
    assert rc == 2 and "pip install 'mm-captioner[ray]'" in capsys.readouterr().err
    assert not list(Path(tmp_path / "o").glob("*.jsonl"))
