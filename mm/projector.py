"""Vision-to-language projector: patch tokens [B, h*w, C] -> LM embeddings [B, N, d_model].

As DeepSeek-VL2: an optional 2x2 pixel shuffle that trades tokens for width
(4x fewer tokens, 4x the channels; the LM's cost is dominated by the image
tokens, see NOTES.md), then a 2-layer GELU MLP. A learned position embedding is
added after the MLP so the LM sees where each token came from even when the
encoder's own position signal is weak (CNNs have none).

Pixel-shuffle order: output token (i, j) of the (h/2, w/2) grid concatenates the
features at (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1), each C wide, so the
channel layout is [top-left | top-right | bottom-left | bottom-right].
"""

from __future__ import annotations

import torch
from torch import nn


def pixel_shuffle(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, h*w, C] (row-major) -> [B, (h/2)*(w/2), 4C], each 2x2 neighbourhood merged into one token."""
    h, w = grid
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"pixel_shuffle: expected {h}*{w}={h * w} tokens for grid {grid}, got {n}")
    if h % 2 or w % 2:
        raise ValueError(f"pixel_shuffle needs an even grid, got (h, w) = {grid}")
    x = tokens.reshape(b, h // 2, 2, w // 2, 2, c)  # [B, i, di, j, dj, C]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [B, i, j, di, dj, C]
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


class Projector(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        grid: tuple[int, int],
        pixel_shuffle: bool = False,
        hidden_mult: int = 1,
        pos_embed: bool = True,
    ):
        super().__init__()
        h, w = grid
        if h <= 0 or w <= 0:
            raise ValueError(f"grid must be positive, got {grid}")
        if pixel_shuffle and (h % 2 or w % 2):
            raise ValueError(
                f"pixel_shuffle needs an even token grid, got (h, w) = {grid}; "
                f"change the image size or the encoder layer, or turn pixel_shuffle off"
            )
        if hidden_mult < 1:
            raise ValueError(f"hidden_mult must be >= 1, got {hidden_mult}")
        self.grid = (h, w)
        self.pixel_shuffle = pixel_shuffle
        self.out_grid = (h // 2, w // 2) if pixel_shuffle else (h, w)
        mlp_in = 4 * in_dim if pixel_shuffle else in_dim
        hidden = hidden_mult * out_dim
        self.in_dim, self.out_dim = in_dim, out_dim
        self.fc1 = nn.Linear(mlp_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)
        if pos_embed:
            # small, so the MLP output dominates at the start of training
            self.pos_embed = nn.Parameter(torch.empty(self.num_tokens, out_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        else:
            self.register_parameter("pos_embed", None)

    @property
    def num_tokens(self) -> int:
        return self.out_grid[0] * self.out_grid[1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, h*w, in_dim] -> [B, num_tokens, out_dim]."""
        h, w = self.grid
        if tokens.dim() != 3 or tokens.shape[1] != h * w or tokens.shape[2] != self.in_dim:
            raise ValueError(
                f"Projector expected tokens [B, {h * w}, {self.in_dim}] (grid {self.grid}), "
                f"got {tuple(tokens.shape)}"
            )
        if self.pixel_shuffle:
            tokens = pixel_shuffle(tokens, self.grid)
        x = self.fc2(self.act(self.fc1(tokens)))
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        return x

    def extra_repr(self) -> str:
        return f"grid={self.grid}, pixel_shuffle={self.pixel_shuffle}, num_tokens={self.num_tokens}"
