"""Resuming after damage: `--resume auto` skips a checkpoint that does not load (saying which and
why) and reaches the same weights as an uninterrupted run; stale save folders are removed; the
log never repeats a step."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mm.checkpoint import CheckpointError, atomic_dir, clean_stale
from mm.cli import main
from train import trainer as T

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for conftest helpers
from conftest import micro_train_config  # noqa: E402


def small_config(synth_shards, out_dir, **changes):
    cfg = micro_train_config(synth_shards, out_dir, save_every=4, keep_last=5, log_every=2, **changes)
    return cfg.replace(optim=cfg.optim.replace(max_steps=12, batch_size=4))


@pytest.fixture(scope="module")
def reference(synth_shards, tmp_path_factory):
    """An uninterrupted 12-step run: checkpoints at 4, 8, 12 and its log."""
    out = tmp_path_factory.mktemp("reference")
    final = T.train(small_config(synth_shards, out))
    return out, final


def same_weights(a: Path, b: Path) -> list[str]:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return [k for k in wa if not torch.equal(wa[k], wb[k])]


def logged(run: Path) -> list[tuple]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss_main"]) for r in map(json.loads, lines)]


def copy_run(reference_dir: Path, dest: Path, steps: list[int]) -> Path:
    """A run directory holding only the given checkpoints of the reference, its tokenizer and full log
    (as if the run had died after its last save, or later)."""
    (dest / "checkpoints").mkdir(parents=True)
    for s in steps:
        shutil.copytree(reference_dir / "checkpoints" / f"step-{s:08d}", dest / "checkpoints" / f"step-{s:08d}")
    shutil.copy(reference_dir / "tokenizer.json", dest / "tokenizer.json")
    shutil.copy(reference_dir / "metrics.jsonl", dest / "metrics.jsonl")
    return dest


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("damage", ["truncated weights", "empty weights", "truncated state", "state of junk"])
def test_resume_auto_skips_a_damaged_newest_checkpoint(reference, synth_shards, tmp_path, capsys, damage):
    ref_dir, ref_final = reference
    run = copy_run(ref_dir, tmp_path / "run", [4, 8])
    newest = run / "checkpoints" / "step-00000008"
    file = newest / ("model.safetensors" if "weights" in damage else "train_state/state.pt")
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "state": b"not a pickle"}[damage.split()[0]])
    final = T.train(small_config(synth_shards, run), resume="auto")
    said = capsys.readouterr()
    assert f"skipped {newest}" in said.out + said.err and file.name in said.out + said.err
    assert "resumed from" in said.out + said.err and "step-00000004" in said.out + said.err
    assert same_weights(ref_final, final) == []
    assert logged(run) == logged(ref_dir)  # steps 6, 8 were logged again, each once


def test_resume_removes_stale_save_folders_and_never_repeats_a_step(reference, synth_shards, tmp_path):
    ref_dir, ref_final = reference
    run = copy_run(ref_dir, tmp_path / "run", [4, 8])
    pid = _dead_pid()
    stale = run / "checkpoints" / f".step-00000012.tmp-{pid}"
    (stale / "train_state").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a file")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "loss_ma')  # killed mid-write
    final = T.train(small_config(synth_shards, run), resume="auto")
    assert not stale.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000008",
                                                                      "step-00000012"]
    steps = [s for s, _ in logged(run)]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8, 10, 12]
    assert logged(run) == logged(ref_dir) and same_weights(ref_final, final) == []


def test_no_loadable_checkpoint_is_an_error_naming_each(reference, synth_shards, tmp_path, capsys):
    ref_dir, _ = reference
    run = copy_run(ref_dir, tmp_path / "run", [4, 8])
    for s in (4, 8):
        (run / "checkpoints" / f"step-{s:08d}" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"step-00000004.*model\.safetensors.*step-00000008|"
                                              r"step-00000008.*model\.safetensors.*step-00000004"):
        T.train(small_config(synth_shards, run), resume="auto")
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(small_config(synth_shards, run).to_dict()))
    capsys.readouterr()
    assert main(["train", str(cfg_file), "--resume", "auto"]) == 2
    assert "no checkpoint to resume from could be loaded" in capsys.readouterr().err
    assert main(["train", str(cfg_file), "--resume", str(tmp_path / "nowhere")]) == 2


def test_clean_stale_puts_back_a_replaced_target(tmp_path):
    """A save of an existing target killed between its two renames leaves the old copy aside."""
    target = atomic_dir(tmp_path / "ckpt", lambda d: (d / "a").write_text("old"))
    pid = _dead_pid()
    target.rename(tmp_path / f".ckpt.old-{pid}")
    (tmp_path / f".ckpt.tmp-{pid}").mkdir()
    (tmp_path / f".other.del-{pid}").mkdir()
    live = tmp_path / ".ckpt.tmp-1"  # pid 1 is alive: a save in progress is left alone
    live.mkdir()
    done = clean_stale(tmp_path)
    assert (tmp_path / "ckpt" / "a").read_text() == "old" and len(done) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.tmp-1", "ckpt"]
