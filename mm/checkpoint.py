"""Checkpoint directories: `config.json`, `model.safetensors`, `tokenizer.json` (+ `train_state/`).

Saves are atomic: everything is written into a hidden sibling directory which then
replaces the target by rename, so a crash mid-save never leaves a half-written
checkpoint behind; `clean_stale` removes (or, for a replaced target, restores) what a
killed save left beside it. Weights are read with safetensors only (no pickles). Every
problem with a directory or its files is a `CheckpointError` naming the file and why.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lm.config import CheckpointError, ConfigError
from mm.confidence import FILE as CALIBRATION
from mm.confidence import Calibration
from mm.config import MMConfig
from mm.model import CaptionModel
from mm.tokenizer import Tokenizer

__all__ = ["CheckpointError", "atomic_dir", "check_device", "check_output_dir", "check_output_file", "check_writable_dir", "clean_stale", "load_checkpoint", "load_config",
           "load_state_strict", "read_weights", "remove_dir", "save_checkpoint", "write_checkpoint"]

REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
_STALE = re.compile(r"\.(.+)\.(tmp|old|del)-(\d+)")  # what atomic_dir / remove_dir leave when killed


def atomic_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then move tmp_dir to `target` (replacing it) by renames."""
    target = Path(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            old.rename(target)
        if isinstance(e, (OSError, SafetensorError)):  # a full disk, a read-only place: say where
            raise CheckpointError(f"cannot write {target} ({e}); nothing there was changed") from e
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


def check_output_dir(target: str | Path, flag: str, marker: str) -> None:
    """Refuse, before any work, a directory a save could not write or must not replace: a file, a
    folder of something else (no `marker` file in it), or a place this process cannot write (the
    save writes a sibling, so the nearest existing parent must take new files)."""
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{flag} {target} is a file; a save there would displace it. Choose a new path")
    if target.is_dir() and any(target.iterdir()) and not (target / marker).exists():
        raise CheckpointError(f"{flag} {target} is a folder of something else (no {marker}); a save there would "
                              "replace it. Choose a new or empty path")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"{flag} {target}: {parent} is a file, not a directory")
    check_writable_dir(parent, f"{flag} {target}")


def check_output_file(path: str | Path, flag: str) -> None:
    """Refuse, before any work, an output file that could not be written: a directory, a file in a
    missing directory, an existing file this process cannot write, or a folder it cannot write in."""
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{flag} {path} is a directory; name a file")
    if not p.parent.is_dir():
        raise CheckpointError(f"{flag} {path}: the directory {p.parent} does not exist; create it first")
    if p.exists() and not os.access(p, os.W_OK):
        raise CheckpointError(f"{flag} {path} is not writable")
    check_writable_dir(p.parent, f"{flag} {path}")


def check_writable_dir(folder: Path, what: str) -> None:
    """Create and remove a file in `folder`: permissions, read-only mounts and root alike answer truly."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"{what}: cannot write in {folder} ({e.strerror or e})") from None


def remove_dir(path: str | Path) -> None:
    """Delete a directory so that readers never see it half-deleted: rename, then remove."""
    path = Path(path)
    doomed = path.parent / f".{path.name}.del-{os.getpid()}"
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale(parent: str | Path) -> list[str]:
    """Tidy what killed saves left in `parent` (processes that are gone): a half-written
    `.X.tmp-PID` or `.X.del-PID` is removed; a `.X.old-PID` is the previous X, put back
    if X is missing (the kill fell between the two renames) and removed otherwise."""
    parent, done = Path(parent), []
    for p in sorted(parent.glob(".*-*")) if parent.is_dir() else []:
        m = _STALE.fullmatch(p.name)
        if m is None or not p.is_dir() or _alive(int(m[3])):
            continue
        target = parent / m[1]
        try:
            if m[2] == "old" and not target.exists():
                p.rename(target)
                done.append(f"restored {target.name} from {p.name}")
            else:
                shutil.rmtree(p)
                done.append(f"removed {p.name}")
        except OSError:  # another process tidied it first
            continue
    return done


def save_checkpoint(path, model: CaptionModel, tokenizer: Tokenizer, dtype: torch.dtype | None = None) -> Path:
    """Write a Captioner directory of a model."""
    return write_checkpoint(path, model.cfg, model.state_dict(), tokenizer, dtype=dtype,
                            calibration=model.calibration)


def write_checkpoint(path, cfg: MMConfig, weights: dict[str, torch.Tensor], tokenizer: Tokenizer,
                     dtype: torch.dtype | None = None, calibration: Calibration | None = None,
                     extra: Callable[[Path], None] | None = None) -> Path:
    """Write a Captioner directory from a config and a (possibly gathered) state dict; `extra(tmp_dir)`
    may add files (training's train_state/)."""

    def write(tmp: Path):
        cfg.to_json(tmp / "config.json")
        state = {}
        for k, v in weights.items():
            v = v.detach()
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            state[k] = v.contiguous().cpu()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp / "tokenizer.json")
        if calibration is not None:
            calibration.save(tmp)
        if extra is not None:
            extra(tmp)

    return atomic_dir(path, write)


def load_config(path) -> MMConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {', '.join(missing)}")
    try:
        return MMConfig.from_json(path / "config.json")
    except ConfigError as e:
        where = "" if str(path / "config.json") in str(e) else f"{path / 'config.json'}: "
        raise CheckpointError(f"{where}{e}") from e


def read_weights(file: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; an empty, truncated or corrupt file is a CheckpointError."""
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); the file is damaged or "
                              "incomplete, copy or save it again") from e


def check_device(device) -> torch.device:
    """A device this machine has: cpu, cuda[:N] or mps."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a device name; use cpu, cuda, cuda:N or mps") from e
    present = {"cpu": True, "cuda": torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count(),
               "mps": dev.type == "mps" and torch.backends.mps.is_available()}
    if not present.get(dev.type, False):
        have = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
            ["mps"] if torch.backends.mps.is_available() else [])
        raise ConfigError(f"device {device!r} is not available here; this machine has {', '.join(have)}")
    return dev


def load_checkpoint(path, device="cpu", dtype: torch.dtype | None = None):
    """-> (model in eval mode, tokenizer). Shape or key mismatches name the tensor."""
    path = Path(path)
    check_device(device)
    cfg = load_config(path)
    try:
        tokenizer = Tokenizer.from_file(path / "tokenizer.json")
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    if tokenizer.vocab_size > cfg.lm.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json's "
            f"lm.vocab_size is {cfg.lm.vocab_size}"
        )
    state = read_weights(path / "model.safetensors")  # before building: a damaged file fails fast
    # The weights come from model.safetensors, so the encoder is built without its own weights.
    build_cfg = cfg.replace(vision=cfg.vision.replace(pretrained=False, pretrained_file=""))
    try:
        model = CaptionModel(build_cfg, image_token_id=tokenizer.image_id)
    except (RuntimeError, TypeError, ValueError) as e:  # timm: an unknown model name or a bad model_kwargs
        raise CheckpointError(f"{path / 'config.json'}: cannot build the model it describes ({e})") from e
    model.cfg = cfg
    load_state_strict(model, state, str(path / "model.safetensors"))
    try:
        model.calibration = Calibration.load(path, width=model.vision.out_dim)
    except CheckpointError:
        raise
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path / CALIBRATION}: damaged ({type(e).__name__}: {e}); delete it and run "
                              "mm calibrate again") from e
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer


def load_state_strict(model: torch.nn.Module, state: dict, source: str):
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for k in sorted(set(own) & set(state)):
        if own[k].shape != state[k].shape:
            problems.append(f"{k}: config expects shape {tuple(own[k].shape)}, file has {tuple(state[k].shape)}")
    if problems:
        raise CheckpointError(f"{source} does not match config.json: " + "; ".join(problems[:8]))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))
