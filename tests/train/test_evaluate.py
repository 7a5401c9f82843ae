"""`mm eval` on synthetic test shards: every score is present and consistent."""

import json

from mm.cli import main
from train.eval.caption_metrics import caption_scores


def test_eval_writes_scores_for_each_task(trained_micro, synth_shards, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval", "--checkpoint", str(trained_micro), "--data", synth_shards["test"], "--limit", "12",
               "--task", "caption", "--task", "describe", "--spec-samples", "3", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"caption", "describe", "expert_load", "data_errors"}
    assert res["data_errors"] == {"total": 0, "by_reason": {}, "examples": []}
    for task in ("caption", "describe"):
        s = res[task]
        assert s["n"] == 12 and 0.0 <= s["exact_match"] <= 1.0
        assert set(s["attributes"]) >= {"count", "colour", "shape", "size"}
        assert ("place" in s["attributes"]) == (task == "describe")
        assert 0.0 <= s["mtp_acceptance"] <= 1.0 and s["speculative_matches_greedy"] == 1.0
        # the reported scores are those of the listed predictions
        ex = s["examples"]
        assert caption_scores([e["pred"] for e in ex], [[e["ref"]] for e in ex])["n"] == len(ex)
    assert len(res["expert_load"]["max_over_mean"]) >= 1
    assert all(r >= 1.0 for r in res["expert_load"]["max_over_mean"])
    table = capsys.readouterr().out
    assert "| caption | 12 |" in table and "expert load" in table


def test_eval_without_usable_samples(trained_micro, tmp_path, capsys):
    import tarfile

    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    assert main(["eval", "--checkpoint", str(trained_micro), "--data", str(empty)]) == 2
    assert "no usable samples" in capsys.readouterr().err


def test_eval_counts_broken_samples_by_the_shared_rules(trained_micro, synth_shards, tmp_path, capsys):
    data = open(synth_shards["test"], "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "eval.json"
    rc = main(["eval", "--checkpoint", str(trained_micro), "--data", str(cut), "--task", "caption",
               "--spec-samples", "0", "--out", str(out)])
    assert rc == 0
    skipped = json.loads(out.read_text())["data_errors"]
    assert skipped["by_reason"]["bad_shard"] == 1 and skipped["examples"][0]["url"] == str(cut)
    assert "bad_shard 1" in capsys.readouterr().err
