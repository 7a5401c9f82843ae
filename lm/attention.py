"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, DeepSeek-V3 section 2.1.1).

Queries go through an optional low-rank bottleneck (`wq_a` -> `q_norm` -> `wq_b`, or
a plain `wq` when q_lora_rank is 0); keys and values share one compressed latent
c_KV = kv_norm(wkv_a(x)[:kv_lora_rank]), expanded per head by `wkv_b`. Position
enters only through the decoupled rope part: a rope slice of each query head and
ONE rope key computed from x and shared by all heads.

Two paths give the same numbers:
- naive (training / prefill without a cache): expand the latent into per-head keys
  and values and call scaled_dot_product_attention;
- absorbed (with a cache): fold wkv_b's key half into the query and its value half
  into the output, so attention runs directly against the cached latent
  [B, S, kv_lora_rank] and rope key [B, S, qk_rope_head_dim]. It costs
  H * kv_lora_rank MACs per cached token instead of materialising keys and values.
Both take the attention softmax in fp32. The absorbed path reads `wkv_b.weight`
directly (as the reference does), so a quantised wkv_b must still expose `.weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm.cache import LayerCache
from lm.config import LMConfig
from lm.norm import RMSNorm
from lm.rope import apply_rope, softmax_scale


class MLA(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads = h
        self.q_lora_rank = cfg.q_lora_rank or 0
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = softmax_scale(cfg)
        # Latent norms use eps 1e-6 whatever rms_norm_eps says, as DeepSeek's code does.
        if self.q_lora_rank:
            self.wq_a = nn.Linear(d, self.q_lora_rank, bias=cfg.attention_bias)
            self.q_norm = RMSNorm(self.q_lora_rank)
            self.wq_b = nn.Linear(self.q_lora_rank, h * self.qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(d, h * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(d, self.kv_lora_rank + self.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_norm = RMSNorm(self.kv_lora_rank)
        self.wkv_b = nn.Linear(self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(h * self.v_head_dim, d, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: LayerCache | None = None) -> torch.Tensor:
        """x [B, T, D]; cos/sin [B, T, R/2]; mask [B, 1, T, S] bool (True = may attend) or
        None for plain causal attention; cache: this layer's LayerCache, which selects
        the absorbed path and receives the T new tokens."""
        b, t, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)
        q = q.view(b, t, self.n_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)  # [B, T, C]
        k_pe = apply_rope(k_pe, cos, sin)  # [B, T, R], one key for all heads
        if cache is None:
            out = self._naive(q_nope, q_pe, kv, k_pe, mask)
        else:
            out = self._absorbed(q_nope, q_pe, kv, k_pe, mask, cache)
        return self.wo(out.flatten(2))

    def _naive(self, q_nope, q_pe, kv, k_pe, mask):
        b, t, h, _ = q_nope.shape
        kv = self.wkv_b(kv).view(b, t, h, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(b, t, h, self.qk_rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale)
        return out.transpose(1, 2)  # [B, T, H, v_head_dim]

    def _absorbed(self, q_nope, q_pe, kv, k_pe, mask, cache: LayerCache):
        t, nope = q_nope.shape[1], self.qk_nope_head_dim
        kv_all, pe_all = cache.append(kv, k_pe)  # [B, S, C], [B, S, R]
        kv_all, pe_all = kv_all.to(q_nope.dtype), pe_all.to(q_nope.dtype)
        s = kv_all.shape[1]
        w = self.wkv_b.weight.view(self.n_heads, nope + self.v_head_dim, self.kv_lora_rank)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w[:, :nope])  # query in latent space
        scores = (torch.einsum("bthc,bsc->bhts", q_lat, kv_all)
                  + torch.einsum("bthr,bsr->bhts", q_pe, pe_all)).float() * self.softmax_scale
        if mask is None:  # causal: new token i sits at cache position s - t + i
            pos = torch.arange(s, device=scores.device)
            mask = pos[None, :] <= pos[s - t:, None]
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(q_nope.dtype)
        out = torch.einsum("bhts,bsc->bthc", probs, kv_all)
        return torch.einsum("bthc,hdc->bthd", out, w[:, nope:])  # [B, T, H, v_head_dim]
