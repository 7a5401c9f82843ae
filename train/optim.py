"""The optimiser: AdamW over per-part parameter groups, and the learning-rate schedule.

Groups are keyed by (part, decays) in the order the parameters are met, so a pipeline rank
that holds a slice of the model, and a checkpoint of the whole model, agree on which group
a parameter belongs to by its name (train/parallel/gather.py relies on it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from train.config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Per-part learning rates; no weight decay on norms, biases, embeddings, router biases."""
    o = cfg.optim
    lrs = {"vision": o.lr_vision or o.lr, "projector": o.lr_projector or o.lr, "lm": o.lr}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = name.split(".", 1)[0]
        part = part if part in lrs else "lm"
        no_decay = p.ndim < 2 or "embed" in name or "norm" in name or name.endswith(".bias")
        key = (part, not no_decay)
        groups.setdefault(key, {"params": [], "lr": lrs[part],
                                "weight_decay": o.weight_decay if not no_decay else 0.0})
        groups[key]["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: TrainConfig):
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, cfg), betas=tuple(o.betas), eps=o.eps)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to min_lr_ratio
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        t = (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)
