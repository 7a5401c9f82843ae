"""Checkpoint directories: `config.json`, `model.safetensors`, `tokenizer.json` (+ `train_state/`).

Saves are atomic: everything is written into a hidden sibling directory which then
replaces the target by rename, so a crash mid-save never leaves a half-written
checkpoint behind. Weights are read with safetensors only (no pickles).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lm.config import ConfigError
from mm.config import MMConfig
from mm.model import CaptionModel
from mm.tokenizer import Tokenizer

REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing a file or does not match its config."""


def atomic_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then move tmp_dir to `target` (replacing it) by renames."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


def save_checkpoint(path, model: CaptionModel, tokenizer: Tokenizer, dtype: torch.dtype | None = None,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write a Captioner directory; `extra(tmp_dir)` may add files (the trainer's train_state/)."""

    def write(tmp: Path):
        model.cfg.to_json(tmp / "config.json")
        state = {}
        for k, v in model.state_dict().items():
            v = v.detach()
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            state[k] = v.contiguous().cpu()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp / "tokenizer.json")
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
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e


def load_checkpoint(path, device="cpu", dtype: torch.dtype | None = None):
    """-> (model in eval mode, tokenizer). Shape or key mismatches name the tensor."""
    path = Path(path)
    cfg = load_config(path)
    tokenizer = Tokenizer.from_file(path / "tokenizer.json")
    if tokenizer.vocab_size > cfg.lm.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json's "
            f"lm.vocab_size is {cfg.lm.vocab_size}"
        )
    # The weights come from model.safetensors, so the encoder is built without its own weights.
    build_cfg = cfg.replace(vision=cfg.vision.replace(pretrained=False, pretrained_file=""))
    model = CaptionModel(build_cfg, image_token_id=tokenizer.image_id)
    model.cfg = cfg
    state = load_file(str(path / "model.safetensors"))
    load_state_strict(model, state, str(path / "model.safetensors"))
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
