"""Fault injection: a training run is killed (SIGKILL, no clean-up of any kind) at points drawn
from a seed: after some optimiser step, in the middle of writing a checkpoint's weights or its
state file, while an old checkpoint is being deleted, or in the middle of a log line. It is then
restarted with `--resume auto` until it finishes. The invariant: it ends with the weights of an
uninterrupted run, bit for bit, and the same log (each step once, the same losses), and leaves no
stale folder behind.

Each attempt runs in a spawned child with one thread (the parent runs the reference the same way,
so thread count cannot change the numbers); a kill is the child sending itself SIGKILL.
"""

import io
import json
import multiprocessing
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for conftest helpers
from conftest import micro_train_config  # noqa: E402

KINDS = ("step", "weights", "state", "delete", "log")
SAVES = ("weights", "state", "delete")


def fault_config(synth_shards, out_dir):
    cfg = micro_train_config(synth_shards, out_dir, save_every=3, keep_last=2, log_every=2)
    return cfg.replace(optim=cfg.optim.replace(max_steps=10, batch_size=4))


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(kind: str, nth: int) -> None:
    """Make the nth event of `kind` in this process kill it, halfway through where that means anything."""
    import mm.checkpoint
    import train.checkpoints
    import train.runlog
    from train import trainer as T

    count = {"n": 0}

    def due() -> bool:
        count["n"] += 1
        return count["n"] == nth

    if kind == "step":
        real_step = T.train_step
        T.train_step = lambda *a, **k: (_die() if due() else None) or real_step(*a, **k)
    elif kind == "weights":
        real_save_file = mm.checkpoint.save_file

        def save_file(tensors, path, metadata=None):
            if not due():
                return real_save_file(tensors, path, metadata=metadata)
            real_save_file(tensors, path + ".whole", metadata=metadata)
            data = Path(path + ".whole").read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            _die()
        mm.checkpoint.save_file = save_file
    elif kind == "state":
        real_save = torch.save

        def save(obj, f, *a, **k):
            if not due():
                return real_save(obj, f, *a, **k)
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            Path(f).write_bytes(buf.getvalue()[: buf.tell() // 2])
            _die()
        train.checkpoints.torch.save = save
    elif kind == "delete":
        real_remove = train.checkpoints.remove_dir

        def remove_dir(path):
            if not due():
                return real_remove(path)
            os.rename(path, path.parent / f".{path.name}.del-{os.getpid()}")
            _die()
        train.checkpoints.remove_dir = remove_dir
    else:
        real_write = train.runlog.RunLog.write

        def write(self, record):
            if not due():
                return real_write(self, record)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record)[:20])
            _die()
        train.runlog.RunLog.write = write


def _attempt(cfg, kind, nth, resume) -> None:
    torch.set_num_threads(1)
    if kind is not None:
        _arm(kind, nth)
    from train import trainer as T

    T.train(cfg, resume=resume)


def _run(cfg, kind=None, nth=0, resume=None) -> int:
    """One attempt in a fresh (spawned) child: its exit code, -9 when the fault killed it. Not
    forked: a parent that has run autograd on other threads (the app and engine tests) cannot fork
    a child that trains."""
    proc = multiprocessing.get_context("spawn").Process(target=_attempt, args=(cfg, kind, nth, resume))
    proc.start()
    proc.join(timeout=300)
    if proc.is_alive():
        proc.kill()
        pytest.fail(f"attempt {kind} #{nth} hung")
    return proc.exitcode


def _schedule(seed: int, kills: int) -> list[tuple[str, int]]:
    """Kill points: the first always mid-save, the others of any kind; nth counted per attempt."""
    rng = random.Random(seed)
    limits = {"step": 10, "weights": 3, "state": 3, "delete": 2, "log": 5}
    kinds = [rng.choice(SAVES)] + [rng.choice(KINDS) for _ in range(kills - 1)]
    return [(k, rng.randint(1, limits[k])) for k in kinds]


def _log(run: Path) -> list[tuple]:
    return [(r["step"], r["loss_main"], r["data_errors"])
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def uninterrupted(synth_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert _run(fault_config(synth_shards, out)) == 0
    return out


def _check_killed_run_matches(uninterrupted, synth_shards, run: Path, seed: int, kills: int):
    cfg, killed = fault_config(synth_shards, run), 0
    for kind, nth in _schedule(seed, kills):
        code = _run(cfg, kind, nth, resume="auto")
        assert code in (0, -signal.SIGKILL), f"seed {seed}: {kind} #{nth} exited {code}"
        killed += code != 0
    assert _run(cfg, resume="auto") == 0, f"seed {seed}: the run did not finish after its kills"
    assert killed >= 1, f"seed {seed}: no kill point was reached"
    ref = load_file(str(uninterrupted / "checkpoints" / "step-00000010" / "model.safetensors"))
    got = load_file(str(run / "checkpoints" / "step-00000010" / "model.safetensors"))
    assert ref.keys() == got.keys() and [k for k in ref if not torch.equal(ref[k], got[k])] == [], seed
    assert _log(run) == _log(uninterrupted), seed
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000009", "step-00000010"], seed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_runs_resume_to_the_same_weights(uninterrupted, synth_shards, tmp_path, seed):
    _check_killed_run_matches(uninterrupted, synth_shards, tmp_path / "run", seed, kills=2)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 23))
def test_killed_runs_resume_to_the_same_weights_many_seeds(uninterrupted, synth_shards, tmp_path, seed):
    _check_killed_run_matches(uninterrupted, synth_shards, tmp_path / "run", seed, kills=4)
