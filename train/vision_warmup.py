"""A short supervised warm-up of the vision encoder on the synthetic scenes, before captioning.

Trained from captions alone, the bundled model's encoder learns colour, size,
count and position within a few hundred steps but not shape: 1800 steps left
shape at chance. Captions name an object's shape only after its size and
colour, and the language model settles into attending elsewhere at that
position, so almost no shape gradient reaches the encoder. The same encoder
learns shape in under 100 steps when told it directly, and a captioner started
from such an encoder reads shape within 200 steps. So the recipe first trains
the encoder for a few hundred steps to name, for each of the 3x3 grid cells, the
shape, colour and size of the object there (or that the cell is empty), on
scenes rendered on the fly from the training split; the linear heads are then
dropped and captioning training starts from the encoder's weights.

This stage knows the scene grammar, so it is for the synthetic recipe only;
leave `vision_warmup.steps` at 0 for other data.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from train.data.scenes import COLOURS, SHAPES, SIZES, render, sample_rng, sample_scene
from vision.encoder import VisionEncoder

# per-cell targets; class 0 of each means "no object in this cell"
ATTRIBUTES = {"shape": tuple(SHAPES), "colour": tuple(COLOURS), "size": tuple(SIZES)}


def scene_batch(start: int, size: int, seed: int, transform,
                augment=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training-split scenes start..start+size-1 -> images [B, 3, H, W] and per-cell labels [B, 9];
    `augment(pil, rng)` (pixel-level changes only: the labels are per grid cell) changes each image."""
    images, labels = [], {k: torch.zeros(size, 9, dtype=torch.long) for k in ATTRIBUTES}
    for i in range(size):
        rng = sample_rng("train", seed, start + i)
        scene = sample_scene(rng)
        image = render(scene)
        images.append(transform(image if augment is None else augment(image, rng)))
        for obj in scene.objects:
            for name, values in ATTRIBUTES.items():
                labels[name][i, obj.cell] = 1 + values.index(getattr(obj, name))
    return torch.stack(images), labels


def cell_features(encoder: VisionEncoder, images: torch.Tensor) -> torch.Tensor:
    """Encoder tokens averaged over each cell of the 3x3 scene grid -> [B, 9, C]."""
    tokens = encoder(images)
    h, w = encoder.grid
    grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
    return F.adaptive_avg_pool2d(grid.float(), 3).flatten(2).transpose(1, 2)


def warm_up_vision(encoder: VisionEncoder, transform, *, steps: int, lr: float, batch_size: int,
                   weight_decay: float, seed: int, autocast_dtype: torch.dtype | None = None,
                   channels_last: bool = True, device: torch.device | str = "cpu",
                   show_progress: bool = True, say=print, augment=None) -> dict[str, float]:
    """Train `encoder` in place on per-cell scene attributes; returns the accuracies of the last 20 steps."""
    if steps <= 0:
        raise ValueError(f"vision warm-up needs steps > 0, got {steps}")
    device = torch.device(device)
    heads = nn.ModuleDict({k: nn.Linear(encoder.out_dim, 1 + len(v)) for k, v in ATTRIBUTES.items()}).to(device)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # index range disjoint from the shards the synthetic recipe writes (indices < 2**31)
    offset = 2**31 + random.Random(seed).randrange(2**30)
    encoder.train()
    recent: dict[str, list[float]] = {k: [] for k in ATTRIBUTES}
    bar = tqdm(range(steps), desc="vision warm-up", disable=not show_progress, dynamic_ncols=True)
    for step in bar:
        images, labels = scene_batch(offset + step * batch_size, batch_size, seed, transform, augment)
        images = images.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            feats = cell_features(encoder, images)
        loss = torch.zeros((), device=device)
        for name, head in heads.items():
            logits, target = head(feats), labels[name].to(device)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), target.flatten())
            filled = target > 0
            acc = (logits.argmax(-1)[filled] == target[filled]).float().mean().item()
            recent[name] = (recent[name] + [acc])[-20:]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", shape_acc=f"{recent['shape'][-1]:.2f}")
    bar.close()
    result = {f"{k}_acc": sum(v) / len(v) for k, v in recent.items()}
    say("vision warm-up: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()) + " (last 20 steps)")
    return result
