"""The DeepSeek-V3-style decoder: embedding, pre-norm MLA + (dense | MoE) blocks, final norm, head, MTP.

Parameter names follow DeepSeek's reference `inference/model.py` (`embed`,
`layers.N.attn.wkv_a`, `layers.N.ffn.gate.bias`, `norm`, `head`, ...) so checkpoint
conversion is a key map; routed experts are stacked (`ffn.experts.w1` [E, inter, D]).
MTP modules live in `mtp.K` with their block under `mtp.K.block`.

Padding: `attention_mask` [B, S] (S = cached + new tokens, 1 = real) gives each
token the position cumsum - 1, so left-padded batches decode like unpadded ones.
Every query may also attend to itself, which keeps the softmax of a padding query
finite without affecting real queries (their own key is always real).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lm.attention import MLA
from lm.cache import KVCache, LayerCache
from lm.config import LMConfig
from lm.moe import MLP, MoE
from lm.mtp import MTPModule
from lm.norm import RMSNorm
from lm.rope import RotaryEmbedding


@dataclass
class LMOutput:
    logits: torch.Tensor  # [B, T, V]
    hidden: torch.Tensor  # [B, T, D], last layer output before the final norm
    aux_loss: torch.Tensor  # scalar: sequence-wise balance loss summed over MoE layers
    expert_counts: torch.Tensor | None = None  # [MoE layers, B, E]: real tokens of each row per expert


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: LMConfig):
        super().__init__()
        self.attn = MLA(cfg)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache: LayerCache | None = None, valid=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            y, aux, counts = self.ffn(h, valid)
        else:
            y, aux, counts = self.ffn(h), x.new_zeros((), dtype=torch.float32), None
        return x + y, aux, counts


def positions_and_mask(attention_mask: torch.Tensor | None, start: int, batch: int, t: int,
                       device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Positions [B, T] of the T new tokens after `start` cached ones, the attention mask
    [B, 1, T, start + T] (None = plain causal) and the real-token flags [B, T] (or None)."""
    s = start + t
    if attention_mask is None:
        return (start + torch.arange(t, device=device)).expand(batch, t), None, None
    if tuple(attention_mask.shape) != (batch, s):
        raise ValueError(f"attention_mask: expected shape [{batch}, {s}] ({start} cached + {t} new "
                         f"tokens), got {list(attention_mask.shape)}")
    real = attention_mask.to(device=device, dtype=torch.bool)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
    key = torch.arange(s, device=device)
    query = key[start:, None]  # [T, 1]
    mask = (key <= query) & (real[:, None, :] | (key == query))  # [B, T, S]
    return positions, mask[:, None], real[:, start:]


class Transformer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        last = cfg.num_hidden_layers - 1  # MTP blocks copy the last layer's type (MoE or dense)
        self.mtp = nn.ModuleList(MTPModule(cfg, Block(last, cfg)) for _ in range(cfg.num_nextn_predict_layers))
        self.rope = RotaryEmbedding(cfg)
        self.reset_parameters()
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, initializer_range); the projections that write into the residual stream
        (wo, w2) are scaled by 1/sqrt(2 * layers) so its variance does not grow with depth."""
        std = self.cfg.initializer_range
        out_std = std / math.sqrt(2 * max(self.cfg.num_hidden_layers, 1))
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif p.dim() == 1:  # linear biases (attention_bias)
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, out_std if name.endswith(("wo.weight", "w2.weight", "w2")) else std)
        for m in self.modules():
            if isinstance(m, MoE) and m.gate.bias is not None:
                m.gate.bias.zero_()

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None,
                cache: KVCache | None = None, return_hidden: bool = False):
        """Logits [B, T, V], or an LMOutput when return_hidden. A cache selects absorbed MLA."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Transformer: pass exactly one of input_ids and inputs_embeds")
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = h.shape[:2]
        start = cache.length if cache is not None else 0
        positions, mask, valid = positions_and_mask(attention_mask, start, b, t, h.device)
        cos, sin = self.rope(positions)
        aux, counts = h.new_zeros((), dtype=torch.float32), []
        for i, layer in enumerate(self.layers):
            h, a, n = layer(h, cos, sin, mask, cache.layer(i) if cache is not None else None, valid)
            aux = aux + a
            if n is not None:
                counts.append(n)
        logits = self.head(self.norm(h))
        if not return_hidden:
            return logits
        return LMOutput(logits, h, aux, torch.stack(counts) if counts else None)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.embed.weight
        return KVCache(len(self.layers), len(self.mtp), batch_size, max_len, self.cfg.kv_lora_rank,
                       self.cfg.qk_rope_head_dim, device=device or p.device, dtype=dtype or p.dtype)

    def mtp_step(self, k: int, hidden_prev: torch.Tensor, embeds_ahead: torch.Tensor,
                 attention_mask=None, cache: KVCache | None = None):
        """One MTP depth k (1-based) on aligned [B, n, D] inputs -> (logits [B, n, V], hidden [B, n, D]).

        With a cache, appends the n positions to MTP layer k's cache; attention_mask then
        covers that layer's cached length + n.
        """
        if not 1 <= k <= len(self.mtp):
            raise ValueError(f"mtp_step: depth {k} not in 1..{len(self.mtp)} (num_nextn_predict_layers)")
        b, n = hidden_prev.shape[:2]
        layer_cache = cache.mtp_layer(k) if cache is not None else None
        start = layer_cache.length if layer_cache is not None else 0
        positions, mask, valid = positions_and_mask(attention_mask, start, b, n, hidden_prev.device)
        cos, sin = self.rope(positions)
        h, _, _ = self.mtp[k - 1](hidden_prev, embeds_ahead, cos, sin, mask, layer_cache, valid)
        return self.head(self.mtp[k - 1].norm(h)), h

    def mtp_logits(self, hidden: torch.Tensor, inputs_embeds: torch.Tensor,
                   attention_mask=None) -> list[torch.Tensor]:
        """Training-time MTP over a full sequence: depth k -> [B, T-k, V]; entry i is computed
        from h^{k-1}_i and Emb(t_{i+k}) and predicts t_{i+k+1}. Depths run to cfg.mtp_depths
        (default: one per module); depths past the last module apply that module again to its
        own output, the chain speculative decoding drafts with. The MTP blocks' balance loss
        is not returned (their routers are balanced by the bias update)."""
        t, n_modules = hidden.shape[1], len(self.mtp)
        out, h = [], hidden
        for k in range(1, self.cfg.mtp_loss_depths + 1):
            n = max(t - k, 0)
            am = None
            if attention_mask is not None:  # position i is real only if tokens i and i+k are
                am = attention_mask[:, :n].bool() & attention_mask[:, k:k + n].bool()
            logits, h = self.mtp_step(min(k, n_modules), h[:, :n], inputs_embeds[:, k:k + n], am)
            out.append(logits)
        return out
