"""Training checkpoints: a Captioner directory plus `train_state/`, saved atomically.

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

from mm.checkpoint import (
    CheckpointError,
    clean_stale,
    load_state_strict,
    read_weights,
    remove_dir,
    save_checkpoint,
)
from train import dist as D

STATE_FILE = "train_state/state.pt"
STATE_KEYS = ("step", "data", "bad_steps", "skipped", "optimizer", "scheduler", "rng_torch", "rng_python",
              "rng_python_version", "rng_python_gauss")


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


def save_training_checkpoint(raw, tokenizer, opt, sched, state, cfg, info) -> Path:
    out = Path(cfg.out_dir) / "checkpoints" / f"step-{state['step']:08d}"
    full_model = _full_state(raw, info)
    optim_state = _full_optim_state(raw, opt, info)
    if info.is_main:
        def write_state(tmp: Path):
            (tmp / "train_state").mkdir()
            torch.save({
                "step": state["step"], "data": state["data"], "bad_steps": state["bad_steps"],
                "skipped": state["skipped"], "log_window": state.get("log_window", []),
                "optimizer": optim_state, "scheduler": sched.state_dict(),
                "rng_torch": torch.get_rng_state(), "rng_python": list(random.getstate()[1]),
                "rng_python_version": random.getstate()[0], "rng_python_gauss": random.getstate()[2],
                "train_config": cfg.to_dict(),
            }, tmp / STATE_FILE)

        clean_stale(out.parent)
        save_checkpoint(out, _StateView(raw, full_model), tokenizer, extra=write_state)
        for old in _checkpoints(Path(cfg.out_dir))[: -cfg.keep_last]:
            remove_dir(old)
    D.barrier(info)
    return out


class _StateView:
    """What save_checkpoint needs of a model: its config and a (gathered) state dict."""

    def __init__(self, model, state):
        self.cfg, self._state = model.cfg, state

    def state_dict(self):
        return self._state


def _full_state(model, info):
    """The full (unsharded) state dict, also under FSDP2."""
    if info.enabled and _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def _full_optim_state(model, opt, info):
    if info.enabled and _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                             cpu_offload=True))
    return opt.state_dict()


def _is_fsdp(model) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


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


def load_train_state(path, raw, opt, sched, info) -> dict:
    """Restore weights, optimiser, scheduler and RNG from a training checkpoint."""
    path = Path(path)
    weights, blob = read_train_state(path)
    if info.enabled and _is_fsdp(raw):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(raw, weights, options=opts)
        set_optimizer_state_dict(raw, opt, blob["optimizer"], options=opts)
    else:
        load_state_strict(raw, weights, str(path / "model.safetensors"))
        apply_state(path, lambda: opt.load_state_dict(blob["optimizer"]))
    apply_state(path, lambda: sched.load_state_dict(blob["scheduler"]))
    apply_state(path, lambda: restore_rng(blob))
    return run_state(blob)


def run_state(blob: dict) -> dict:
    """The trainer's state from a saved one; the carried log window's throughput counts are this
    process's only, so they restart at zero (older checkpoints carry no window)."""
    window = [dict(w, tokens=0, images=0) for w in blob.get("log_window", [])]
    return {k: blob[k] for k in ("step", "data", "bad_steps", "skipped")} | {"log_window": window}


def apply_state(path: Path, restore: Callable[[], None]) -> None:
    """Run `restore`; a saved state that does not fit this run names the checkpoint."""
    try:
        restore()
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
    meta.update({"recipe": recipe, "commit": git_commit(), "steps": state["step"]})
    raw.cfg = raw.cfg.replace(meta=meta)
    from train.lora import merged_state_dict  # LoRA adapters are folded into the weights

    return save_checkpoint(path, _StateView(raw, merged_state_dict(raw)), tokenizer, dtype=torch.bfloat16)
