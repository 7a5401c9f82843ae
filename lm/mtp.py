"""Multi-Token Prediction (DeepSeek-V3 section 2.2): D sequential modules, one per extra depth.

Module k combines the previous depth's hidden state h^{k-1}_i with the embedding of
token t_{i+k}: h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]) (embedding
first, the order public checkpoints store `eh_proj` in), runs one transformer block
and predicts t_{i+k+1} through its own final norm (`shared_head.norm` in DeepSeek-V3's
published checkpoints) and the model's shared output head. The
causal chain is kept: depth k sees depth k-1's prediction state, not a parallel head.

The loss is lambda / D * sum_k CE_k (eq. 24-25), added to the main next-token loss
by the trainer. At inference the modules draft tokens for self-speculative decoding.
"""

from __future__ import annotations

import torch
from torch import nn

from lm.config import LMConfig
from lm.loss import ce_sum, target_counts
from lm.norm import RMSNorm


class MTPModule(nn.Module):
    """enorm, hnorm, eh_proj, one transformer `block` (built by the model, same type as its last
    layer) and the final `norm` applied before the shared output head."""

    def __init__(self, cfg: LMConfig, block: nn.Module):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = block
        self.norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, hidden_prev: torch.Tensor, embeds_ahead: torch.Tensor, cos, sin,
                mask=None, cache=None, valid=None):
        """hidden_prev, embeds_ahead [B, n, D] aligned -> the block's (output [B, n, D], aux loss, counts)."""
        if hidden_prev.shape != embeds_ahead.shape:
            raise ValueError(f"MTP: hidden_prev {tuple(hidden_prev.shape)} and embeds_ahead "
                             f"{tuple(embeds_ahead.shape)} must have the same shape")
        x = self.eh_proj(torch.cat([self.enorm(embeds_ahead), self.hnorm(hidden_prev)], dim=-1))
        return self.block(x, cos, sin, mask, cache, valid)


def mtp_loss(mtp_logits: list[torch.Tensor], labels: torch.Tensor, mtp_lambda: float,
             counts: list[torch.Tensor] | None = None):
    """lambda / D * sum_k CE(mtp_logits[k-1][:, i], labels[:, i+k+1]) and {"mtp_k": float}.

    labels [B, T] are aligned with the input positions (lm/loss.py); each depth's CE is a sum
    over its targets divided by counts[k] (lm.loss.target_counts), by default those of `labels`
    themselves: a mean over the depth's targets, 0 when there are none. A microbatch passes the
    whole batch's counts.
    """
    if not mtp_logits:
        return labels.new_zeros((), dtype=torch.float32), {}
    t = labels.shape[1]
    counts = target_counts(labels, len(mtp_logits)) if counts is None else counts
    total, parts = 0.0, {}
    for k, logits in enumerate(mtp_logits, start=1):
        if logits.shape[1] != t - k:
            raise ValueError(f"mtp_loss: depth {k} logits cover {logits.shape[1]} positions, "
                             f"expected T - k = {t - k} for labels of length {t}")
        n = max(t - k - 1, 0)  # the last entry's target t_{T} lies past the sequence
        loss_k = ce_sum(logits[:, :n], labels[:, k + 1:]) / counts[k]
        total = total + loss_k
        parts[f"mtp_{k}"] = float(loss_k.detach())
    return mtp_lambda / len(mtp_logits) * total, parts
