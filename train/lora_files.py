"""Saved LoRA adapters: `adapters.safetensors` and `adapter_config.json` (`--save-adapters DIR`).

The file holds what a LoRA run trains, under the adapted model's own keys
(`lm.layers.0.attn.wkv_b.lora.A`, and e.g. `projector.*` when the projector trained fully);
the JSON holds the `lora` settings that fix the adapters' layout (rank, alpha, targets, ...),
which a run continuing from them (`mm finetune --adapters DIR`) takes over.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lm.config import CheckpointError
from train.config import LoRAConfig

ADAPTER_FILE, CONFIG_FILE = "adapters.safetensors", "adapter_config.json"
STRUCTURE = ("rank", "alpha", "targets", "experts", "mtp", "vision", "vision_targets", "train_mtp")


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA run changes: the adapters and any part trained fully beside them (projector, MTP)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_adapters(model: nn.Module, path, cfg: LoRAConfig) -> Path:
    """`path/adapters.safetensors` (trained tensors under their model keys) and `path/adapter_config.json`."""
    from safetensors.torch import save_file

    from mm.checkpoint import atomic_dir, check_output_dir

    check_output_dir(path, "adapters", ADAPTER_FILE)
    tensors = trained_tensors(model)
    meta = {"lora": {k: getattr(cfg, k) for k in (*STRUCTURE, "dropout", "train_projector")},
            "trained": sorted(n for n in tensors if ".lora." not in n), "tasks": model.cfg.tasks}

    def write(tmp: Path):
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    return atomic_dir(path, write)


def read_adapter_config(path) -> dict:
    file = Path(path) / CONFIG_FILE
    if not (Path(path) / ADAPTER_FILE).is_file() or not file.is_file():
        raise CheckpointError(f"{path}: not a saved adapter directory (needs {ADAPTER_FILE} and {CONFIG_FILE}; "
                              "write one with mm finetune --stage lora --save-adapters DIR)")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        LoRAConfig.from_dict(meta["lora"])
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, no "lora" section, bad values (ConfigError)
        raise CheckpointError(f"{file}: not a valid adapter config ({type(e).__name__}: {e})") from e
    return meta


def with_saved_structure(cfg: LoRAConfig, path) -> tuple[LoRAConfig, dict]:
    """cfg with the rank, alpha and targets of the adapters saved in `path`, and {field: (cfg's, saved)}
    for what that changed: adapters only load into the layout they were trained in."""
    saved = read_adapter_config(path)["lora"]
    changed = {k: (getattr(cfg, k), saved[k]) for k in STRUCTURE if k in saved and saved[k] != getattr(cfg, k)}
    return cfg.replace(**{k: saved[k] for k in STRUCTURE if k in saved}, adapters=str(path)), changed


@torch.no_grad()
def load_adapters(model: nn.Module, path) -> int:
    """Load saved adapters (and fully trained parts) into an adapted model; every adapter of the model
    must be in the file with its shape. Returns the number of tensors loaded."""
    from mm.checkpoint import read_weights

    read_adapter_config(path)
    file = Path(path) / ADAPTER_FILE
    weights, own = read_weights(file), dict(model.named_parameters())
    missing = sorted(n for n in own if ".lora." in n and n not in weights)
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: model {tuple(own[k].shape)}, file {tuple(v.shape)}" for k, v in weights.items()
              if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{file} does not fit this model's adapters: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}, shapes {shapes[:4]}")
    # NaN or infinite weights would merge into a model that writes "" with confidence NaN
    broken = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{file}: non-finite values (NaN or infinity) in {broken[:4]}"
                              f"{' ...' if len(broken) > 4 else ''}; the adapters are damaged, save them again")
    for k, v in weights.items():
        own[k].copy_(v.to(own[k].dtype))
    return len(weights)
