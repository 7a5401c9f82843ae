"""Decoupled rotary position embedding for MLA, with optional YaRN context extension.

Only the `qk_rope_head_dim` slice of each query head and the single shared rope key
are rotated (DeepSeek-V2 section 2.1.3). Pairs are *interleaved*: dims (0, 1),
(2, 3), ... form the complex numbers that are rotated, as in DeepSeek's reference
inference code (`view_as_complex` on pairs). Transformers' DeepSeek-V3 instead
de-interleaves (evens first, odds second) and applies rotate_half; both place the
same rotated pairs in q and k, only in a different order, so q . k and therefore
the logits are identical for the same weights.

YaRN (Peng et al. 2023) blends interpolated and original frequencies with a linear
ramp between the dims that make `beta_fast` and `beta_slow` turns over the original
context; the softmax scale gains mscale^2 with mscale = 0.1 * mscale_all_dim *
ln(factor) + 1, and cos/sin are multiplied by mscale(mscale) / mscale(mscale_all_dim)
(1 for DeepSeek-V3, where both are equal, which is why the reference omits it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lm.config import ConfigError, LMConfig

YARN_KEYS = ("factor", "original_max_position_embeddings")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(cfg: LMConfig) -> dict | None:
    rs = cfg.rope_scaling
    if not rs:
        return None
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"LMConfig.rope_scaling: only type 'yarn' is supported, got {kind!r}")
    missing = [k for k in YARN_KEYS if k not in rs]
    if missing:
        raise ConfigError(f"LMConfig.rope_scaling: missing key(s) {missing} for YaRN")
    return rs


def rope_frequencies(cfg: LMConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [qk_rope_head_dim / 2] (fp32) and the cos/sin amplitude."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    rs = _yarn(cfg)
    if rs is None:
        return inv_freq, 1.0
    factor = float(rs["factor"])
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(turns: float) -> float:
        # the dim index whose wavelength fits `turns` times into the original context
        return dim * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp 0 -> keep the original (high) frequency, ramp 1 -> interpolate by `factor`
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all:
        amplitude = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    else:
        amplitude = yarn_mscale(factor)
    return inv_freq, float(amplitude)


def softmax_scale(cfg: LMConfig) -> float:
    """qk_head_dim^-0.5, times mscale^2 under YaRN (the attention-temperature correction)."""
    scale = cfg.qk_head_dim**-0.5
    rs = _yarn(cfg)
    if rs is not None and rs.get("mscale_all_dim"):
        m = yarn_mscale(float(rs["factor"]), rs["mscale_all_dim"])
        scale = scale * m * m
    return scale


class RotaryEmbedding(nn.Module):
    """Maps positions [B, T] to (cos, sin) [B, T, qk_rope_head_dim / 2] in fp32."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        inv_freq, self.amplitude = rope_frequencies(cfg)
        # not persistent: derived from the config, so never part of a checkpoint
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[..., None] * self.inv_freq.float()
        return angles.cos() * self.amplitude, angles.sin() * self.amplitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, H, R] (or [B, T, R]) by the angles of cos/sin [B, T, R/2].

    The rotation is done in fp32 and cast back, like the reference's complex multiply.
    """
    if x.shape[-1] != 2 * cos.shape[-1]:
        raise ValueError(f"apply_rope: last dim {x.shape[-1]} expected 2 * {cos.shape[-1]}")
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
