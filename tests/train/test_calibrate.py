"""`mm calibrate` and `mm eval --changes` on a micro checkpoint: the threshold flags at most the asked
share of held-out changed images, it is stored in the checkpoint, and bad options exit 2."""

import json
import shutil

import pytest
from PIL import Image

from mm.captioner import Captioner
from mm.cli import main


def test_calibrate_writes_a_threshold_that_flags_at_most_the_asked_share(trained_micro, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_micro, ckpt, ignore=shutil.ignore_patterns("train_state"))
    rc = main(["calibrate", "--checkpoint", str(ckpt), "--fit", "64", "--held-out", "8", "--crops", "0",
               "--tasks", "caption", "describe", "--max-flagged", "0.1", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert rc == 0 and "thresholds caption" in out and "offline photos" in out
    cap = Captioner.from_pretrained(ckpt)
    cal = cap.model.calibration
    assert cal is not None and set(cal.thresholds) == {"caption", "describe"} and cal.radius > 0
    assert all(0 < t <= 1 for t in cal.thresholds.values())
    flagged = cal.info["held_out_flagged"]
    assert set(flagged) >= {"none", "jpeg40", "canvas4:3"}
    assert sum(flagged.values()) / len(flagged) <= 0.1  # the quantile rule, per task over its held-out images
    assert cal.info["pictures"]["photo"]["sources"] > 0  # scikit-image's samples are installed with the dev extras
    # the scores it reports are what the captioner computes
    res = cap.run(Image.new("RGB", (40, 30), "white"))
    assert len(res.confidence) == 1 and res.unfamiliar == [res.confidence[0] < cal.threshold("caption")]


@pytest.mark.parametrize("args, named", [(["--fit", "10"], "--fit"), (["--max-flagged", "1.5"], "--max-flagged"),
                                         (["--tasks", "nope"], "nope")])
def test_calibrate_refuses_bad_options(trained_micro, args, named, capsys):
    assert main(["calibrate", "--checkpoint", str(trained_micro), *args]) == 2
    assert named in capsys.readouterr().err


def test_eval_scores_under_changes(trained_micro, synth_shards, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval", "--checkpoint", str(trained_micro), "--data", synth_shards["test"], "--limit", "6",
               "--task", "caption", "--spec-samples", "0", "--changes", "none", "jpeg40", "canvas4:3",
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "exact match under image changes" in printed
    res = json.loads(out.read_text())
    assert set(res["changes"]) == {"none", "jpeg40", "canvas4:3"}
    assert res["changes"]["none"]["caption"]["exact_match"] == res["caption"]["exact_match"]  # same images, same text
    assert 0 <= res["caption"]["confidence"]["median"] <= 1 and res["caption"]["confidence"]["unfamiliar"] is None
    assert main(["eval", "--checkpoint", str(trained_micro), "--data", synth_shards["test"], "--changes", "sepia"]) == 2
