"""Next-token cross-entropy as a sum and its normaliser, kept apart so that a loss over a
whole batch and the same loss assembled from microbatches (a pipeline's last stage) are
one computation: each piece sums its cross-entropy and divides by the *whole* batch's
target count, so the pieces add up to the batch mean.

Labels sit at the input positions (the Hugging Face convention): the logits at position
i predict labels[i + 1]; `IGNORE_INDEX` marks positions without a loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of positions without a loss (PyTorch cross_entropy's default)


def ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in fp32 of logits [B, n, V] against targets [B, n], ignored ones left out."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def target_counts(labels: torch.Tensor, depths: int = 0) -> list[torch.Tensor]:
    """Targets of the main loss (k = 0) and of each MTP depth k (labels shifted by k + 1), at least 1
    each, so a loss with no targets is 0 rather than nan."""
    return [(labels[:, k + 1:] != IGNORE_INDEX).sum().clamp(min=1) for k in range(depths + 1)]
