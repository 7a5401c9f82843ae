"""Training checkpoints: a Captioner directory plus `train_state/`, saved atomically; one writer
and one reader for every parallelism (each gives its full state, gathered, and takes its share back).

`out_dir/checkpoints/step-00000100/` holds `config.json`, `model.safetensors` (fp32
master weights, router biases included), `tokenizer.json`, and `train_state/` with
the optimiser, scheduler, step, data position and RNG states. Only the newest
`keep_last` are kept. The state file is read with `weights_only=True`.

Resuming reads a checkpoint whole before it changes the model, so a damaged one is
skipped cleanly: `--resume auto` takes the newest checkpoint that loads and says which
it skipped and why. A save killed midway leaves only a hidden `.step-N.tmp-PID` folder,
which the next save (or resume) removes.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from mm.checkpoint import CheckpointError, clean_stale, read_weights, remove_dir, write_checkpoint
from train.parallel.dist import barrier
from train.state import SAVED, STATE_FILE, RunState

STATE_KEYS = (*SAVED, "optimizer", "scheduler", "rng_torch", "rng_python", "rng_python_version", "rng_python_gauss")


def _checkpoints(out_dir: Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / STATE_FILE).is_file())


def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete checkpoint directory (not checked further: see resume_from)."""
    found = _checkpoints(Path(out_dir))
    return found[-1] if found else None


def save(par, tokenizer, opt, sched, state: RunState, cfg) -> Path:
    """Write `out_dir/checkpoints/step-N` from the parallelism's gathered state (rank 0 writes, all
    ranks wait); only the newest keep_last stay. Returns its path."""
    out = Path(cfg.out_dir) / "checkpoints" / f"step-{state.step:08d}"
    full = par.gather_state(opt, sched)
    if full is not None:
        weights, optim_state, sched_state = full
        rng = random.getstate()

        def write_state(tmp: Path):
            (tmp / "train_state").mkdir()
            torch.save(state.to_dict() | {
                "optimizer": optim_state, "scheduler": sched_state, "rng_torch": torch.get_rng_state(),
                "rng_python": list(rng[1]), "rng_python_version": rng[0], "rng_python_gauss": rng[2],
                "train_config": cfg.to_dict(),
            }, tmp / STATE_FILE)

        clean_stale(out.parent)
        write_checkpoint(out, par.model_cfg, weights, tokenizer, extra=write_state)
        for old in _checkpoints(Path(cfg.out_dir))[: -cfg.keep_last]:
            remove_dir(old)
    barrier(par.info)
    return out


def resume_candidates(out_dir, resume: str | None) -> list[Path]:
    """Checkpoints to try, in order: 'auto' = all of out_dir's, newest first; a path = that one."""
    if not resume:
        return []
    if resume == "auto":
        clean_stale(Path(out_dir) / "checkpoints")
        return _checkpoints(Path(out_dir))[::-1]
    if not Path(resume).is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    return [Path(resume)]


def resume_from(candidates: list[Path], load: Callable[[Path], dict], say) -> tuple[Path, dict]:
    """(path, run state) of the first candidate that `load` restores; says which it skipped and why."""
    skipped = []
    for path in candidates:
        try:
            return path, load(path)
        except CheckpointError as e:
            skipped.append(f"{path.name}: {e}")
            if len(candidates) > 1:
                say(f"resume: skipped {path} ({e})")
    raise CheckpointError("no checkpoint to resume from could be loaded: " + "; ".join(skipped))


def read_train_state(path) -> tuple[dict, dict]:
    """(weights, state) of a training checkpoint, read whole before anything is changed."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a training checkpoint (no {STATE_FILE}); "
                              "use mm finetune to start from a Captioner directory")
    weights = read_weights(path / "model.safetensors")
    try:
        blob = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or corrupt file: EOFError, RuntimeError, UnpicklingError, ...
        raise CheckpointError(f"{path / STATE_FILE}: cannot be read ({type(e).__name__}: {e})") from e
    missing = [k for k in STATE_KEYS if k not in blob] if isinstance(blob, dict) else list(STATE_KEYS)
    if missing:
        raise CheckpointError(f"{path / STATE_FILE}: lacks {missing}")
    return weights, blob


def load_train_state(path, par, opt, sched) -> RunState:
    """Restore the parallelism's weights, optimiser and scheduler, and the RNG, from a training checkpoint."""
    path = Path(path)
    weights, blob = read_train_state(path)  # read whole first: a damaged checkpoint changes nothing
    apply_state(path, lambda: par.load_state(weights, blob, opt, sched, path))
    apply_state(path, lambda: restore_rng(blob))
    return RunState.from_saved(blob)


def apply_state(path: Path, restore: Callable[[], None]) -> None:
    """Run `restore`; a saved state that does not fit this run names the checkpoint."""
    try:
        restore()
    except CheckpointError:  # already names its file
        raise
    except (ValueError, KeyError, TypeError, RuntimeError) as e:  # torch's ways of refusing a state dict
        raise CheckpointError(f"{path / STATE_FILE}: does not fit this run ({type(e).__name__}: {e})") from e


def restore_rng(blob: dict) -> None:
    torch.set_rng_state(blob["rng_torch"])
    random.setstate((blob["rng_python_version"], tuple(blob["rng_python"]), blob["rng_python_gauss"]))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def export_model(raw, tokenizer, path, cfg, state) -> Path:
    """A bf16 Captioner directory (no train_state, LoRA adapters merged) that records the recipe and the commit;
    those of the run it was fine-tuned from, if any, move to meta["previous"]."""
    meta = dict(raw.cfg.meta)
    if "recipe" in meta:
        earlier = {k: meta.pop(k) for k in ("recipe", "commit", "steps") if k in meta}
        meta["previous"] = [*meta.get("previous", []), earlier]
    recipe = cfg.to_dict()
    recipe.pop("model")  # the model config is the checkpoint's config.json itself
    meta.update({"recipe": recipe, "commit": git_commit(), "steps": state.step})
    raw.cfg = raw.cfg.replace(meta=meta)
    from train.lora import merged_state_dict  # LoRA adapters are folded into the weights

    return write_checkpoint(path, raw.cfg, merged_state_dict(raw), tokenizer, dtype=torch.bfloat16)
