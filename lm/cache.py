"""The MLA decode cache: per layer only the normed KV latent and the rotated rope key.

That is `kv_lora_rank + qk_rope_head_dim` values per token per layer (DeepSeek-V2
section 2.1.4), instead of 2 * heads * head_dim for ordinary multi-head attention;
the absorbed attention path reads keys and values straight from the latent.

Each layer holds ONE buffer [B, max_len, kv_lora_rank + qk_rope_head_dim]: the latent
followed by the rope key. Every head's query in latent space followed by its rope
part meets that buffer in a single product (lm/decode.py), and `kv` / `pe` are views
of its two halves.

Main layers come first, then one layer per MTP depth. Every layer keeps its own
`length`, the fill level of the reference path (`Transformer.forward` with a cache):
in self-speculative decoding the MTP layers see fewer positions than the main
model, and rejected draft tokens are rolled back with `crop`. The fast decoder
(`lm.Decoder`) instead writes each row at explicit positions, so rows of one batch
may hold sequences of different lengths; it leaves `length` alone.
"""

from __future__ import annotations

import copy

import torch


class LayerCache:
    """A preallocated [B, max_len, kv_lora_rank + rope_dim] buffer for one attention layer."""

    def __init__(self, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 device=None, dtype=None):
        self.buf = torch.zeros(batch_size, max_len, kv_lora_rank + rope_dim, device=device, dtype=dtype)
        self.kv_lora_rank = kv_lora_rank
        self.length = 0

    @property
    def kv(self) -> torch.Tensor:
        return self.buf[..., : self.kv_lora_rank]

    @property
    def pe(self) -> torch.Tensor:
        return self.buf[..., self.kv_lora_rank:]

    @property
    def max_len(self) -> int:
        return self.buf.shape[1]

    def append(self, kv: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write kv [B, T, C] and pe [B, T, R] after the cached tokens; return all [B, length, ...]."""
        b, t = kv.shape[:2]
        if b != self.buf.shape[0]:
            raise ValueError(f"KVCache: batch {b} does not match the cache's batch {self.buf.shape[0]}")
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KVCache: {self.length} cached + {t} new tokens exceed max_len {self.max_len}; "
                             "create the cache with a larger max_len")
        c = self.kv_lora_rank
        # detached: the cache is for inference and must not keep autograd graphs alive
        self.buf[:, self.length:end, :c] = kv.detach().to(self.buf.dtype)
        self.buf[:, self.length:end, c:] = pe.detach().to(self.buf.dtype)
        self.length = end
        return self.buf[:, :end, :c], self.buf[:, :end, c:]

    def crop(self, n: int) -> None:
        self.length = max(0, min(self.length, n))

    def reorder(self, index: torch.Tensor) -> None:
        self.buf = self.buf.index_select(0, index)


class KVCache:
    """Caches for `n_main` transformer layers followed by the MTP layers."""

    def __init__(self, n_main: int, n_mtp: int, batch_size: int, max_len: int, kv_lora_rank: int,
                 rope_dim: int, device=None, dtype=None):
        self.n_main = n_main
        self.layers = [LayerCache(batch_size, max_len, kv_lora_rank, rope_dim, device, dtype)
                       for _ in range(n_main + n_mtp)]

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    def mtp_layer(self, k: int) -> LayerCache:
        """The cache of MTP depth k (1-based)."""
        if not 1 <= k <= len(self.layers) - self.n_main:
            raise IndexError(f"KVCache: MTP depth {k} not in 1..{len(self.layers) - self.n_main}")
        return self.layers[self.n_main + k - 1]

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def batch_size(self) -> int:
        return self.layers[0].buf.shape[0]

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    def crop(self, n: int) -> None:
        """Roll every layer back to at most n tokens (drop rejected speculative tokens)."""
        for layer in self.layers:
            layer.crop(n)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/reorder batch rows in place: row i becomes old row index[i] (beam search)."""
        index = index.to(device=self.layers[0].buf.device, dtype=torch.long)
        for layer in self.layers:
            layer.reorder(index)

    def rows(self, n: int) -> KVCache:
        """The first n rows of this cache as a cache of its own; its buffers are views, so
        what is written through it lands here (the serving engine's running rows)."""
        view = copy.copy(self)
        view.layers = [copy.copy(lc) for lc in self.layers]
        for lc in view.layers:
            lc.buf = lc.buf[:n]
        return view

    def copy_rows(self, dst: torch.Tensor, src: KVCache, src_rows: torch.Tensor, length: int) -> None:
        """Copy the first `length` positions of rows src_rows of `src` into rows dst of this cache
        (the serving engine moves a freshly prefilled request into its running batch)."""
        for mine, theirs in zip(self.layers, src.layers):
            mine.buf[dst, :length] = theirs.buf[src_rows, :length]

    def bytes_per_token(self) -> int:
        """Cache bytes per token per sequence, summed over all layers."""
        return sum(lc.buf.shape[-1] * lc.buf.element_size() for lc in self.layers)
