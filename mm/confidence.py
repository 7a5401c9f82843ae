"""How sure the captioner is of a caption, and whether an image looks like its training data.

A caption's confidence in [0, 1] is the product of two terms:

- the geometric mean of the probabilities the model gave the tokens it wrote
  (`<eos>` included), exp(mean log p): low when the model hesitated between words;
- the image's familiarity, from the Mahalanobis distance d of its mean-pooled encoder
  features to those of the training images: sigmoid((radius - d) / softness). A model
  can be sure of every token of a caption for an image it has never seen the like of (a
  scene-trained model names shapes in a photograph of a cat with probability ~1), so the
  token term alone cannot tell an out-of-world image; the feature distance can.

`Calibration` holds the feature statistics and, per task, the threshold below which an
image is reported as unfamiliar (tasks differ: a short Chinese caption has fewer
near-certain tokens to average than a long English description). `mm calibrate`
(train/eval/calibrate.py) fits it on training-like images and picks the thresholds on
held-out changed scenes; it is saved beside the weights as `calibration.safetensors`. A
model without one (a fine-tuned export, whose encoder has moved) has familiarity 1 and
flags nothing. A calibration file is checked whole when it loads (`Calibration.load`):
a damaged one would flag the wrong images silently, or put NaN into every confidence.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lm.config import CheckpointError
from lm.hf import atomic_file

FILE = "calibration.safetensors"


def chosen_logprob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under softmax(logits): logits [B, V], tokens [B] -> [B] fp32."""
    return logits.float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0]


@dataclass
class Calibration:
    mean: torch.Tensor  # [C] mean pooled encoder feature of the fitting images
    whiten: torch.Tensor  # [C, C]: ||(f - mean) @ whiten|| is the Mahalanobis distance
    radius: float  # distance where familiarity is 0.5
    softness: float  # its scale: familiarity falls from 0.73 to 0.27 over 2 softness
    thresholds: dict  # task -> confidence below which the image is reported as unfamiliar
    info: dict  # how it was fitted and what it scored (written to the file's metadata)

    def threshold(self, task: str) -> float:
        """The task's threshold; a task calibration did not see gets the most lenient one (0 if none)."""
        return self.thresholds.get(task, min(self.thresholds.values(), default=0.0))

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder tokens [B, N, C] -> Mahalanobis distance [B] of their mean."""
        d = features.float().mean(1) - self.mean.to(features.device)
        return (d @ self.whiten.to(features.device)).norm(dim=-1)

    def familiarity(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((self.radius - self.distance(features)) / self.softness)

    def save(self, folder: str | Path) -> None:
        """Written beside its final name and renamed: a full disk leaves the previous file whole."""
        from safetensors import SafetensorError

        meta = {"radius": self.radius, "softness": self.softness, "thresholds": self.thresholds, "info": self.info}
        path = Path(folder) / FILE
        tensors = {"mean": self.mean.float().contiguous(), "whiten": self.whiten.float().contiguous()}
        try:
            atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata={"calibration": json.dumps(meta)}))
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"cannot write {path} ({e}); any previous calibration there is unchanged") from e

    @classmethod
    def load(cls, folder: str | Path, width: int | None = None) -> Calibration | None:
        """The folder's calibration, or None when it has none. Everything is checked against what
        familiarity needs, `width` being the encoder's feature width; a damaged file is a
        CheckpointError naming the field."""
        path = Path(folder) / FILE
        if not path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get("calibration", "null")
        tensors = load_file(str(path))
        try:
            try:
                meta = json.loads(meta)
            except ValueError as e:
                raise ValueError(f"its 'calibration' metadata is not JSON ({e})") from None
            return cls(*_checked_tensors(tensors, width), *_checked_meta(meta))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}; delete it and run mm calibrate again") from None


def _checked_tensors(t: dict, width: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if sorted(t) != ["mean", "whiten"]:
        raise ValueError(f"expected the tensors mean and whiten, found {sorted(t)}")
    mean, whiten = t["mean"], t["whiten"]
    c = width if width is not None else (mean.shape[0] if mean.dim() == 1 else -1)
    for name, x, shape in (("mean", mean, (c,)), ("whiten", whiten, (c, c))):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point, found {x.dtype}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; the encoder's feature width {c} needs {shape}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} holds non-finite values (NaN or infinity)")
    return mean.float(), whiten.float()


def _checked_meta(meta) -> tuple[float, float, dict, dict]:
    if not isinstance(meta, dict):
        raise ValueError("its metadata has no 'calibration' object")

    def number(key, value, ok, rule: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"{key} must be a finite number {rule}, found {value!r}")
        return float(value)

    radius = number("radius", meta.get("radius"), lambda v: v >= 0, ">= 0")
    softness = number("softness", meta.get("softness"), lambda v: v > 0, "> 0")
    thresholds = meta.get("thresholds")
    if not isinstance(thresholds, dict):
        raise ValueError(f"thresholds must be an object task -> confidence, found {thresholds!r}")
    thresholds = {k: number(f"thresholds[{k!r}]", v, lambda v: 0 <= v <= 1, "in [0, 1]")
                  for k, v in thresholds.items()}
    info = meta.get("info", {})
    if not isinstance(info, dict):
        raise ValueError(f"info must be an object, found {type(info).__name__}")
    return radius, softness, thresholds, info


def fit(features: torch.Tensor, shrinkage: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features [n, C] -> (mean, whiten) of a Gaussian with the covariance shrunk toward
    its average variance (a well-conditioned inverse from fewer samples than C^2)."""
    x = features.double()
    mean = x.mean(0)
    cov = torch.cov((x - mean).T)
    cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    whiten = torch.linalg.cholesky(torch.linalg.inv(cov))  # P = W W^T, so d^2 = ||x W||^2
    return mean.float(), whiten.float()


def confidence(mean_logprob: torch.Tensor, familiarity: torch.Tensor | None) -> torch.Tensor:
    conf = mean_logprob.exp()
    return conf if familiarity is None else conf * familiarity


def reported(conf: float, unfamiliar: bool) -> dict:
    """{"confidence", "unfamiliar"} as every output reports them (the API, the page's tables,
    `mm caption`): both None when the confidence is not a number, since JSON has no NaN and no
    flag may rest on one."""
    if not math.isfinite(conf):
        return {"confidence": None, "unfamiliar": None}
    return {"confidence": round(conf, 4), "unfamiliar": bool(unfamiliar)}
