"""RMSNorm, the only normalisation in the model (pre-norm blocks, MLA latents, MTP inputs).

The mean square is taken in fp32 whatever the activation dtype, and the result is
cast back before the weight multiplies it, exactly as DeepSeek's published
modelling code does; in fp32 this is plain `x / sqrt(mean(x^2) + eps) * w`.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
