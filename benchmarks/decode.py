"""Decode speed and cache size: MLA's absorbed latent cache vs an expanded per-head K/V cache.

Ours is `model.new_cache` + one token per step: the cache holds the normed KV latent
and the rotated rope key (kv_lora_rank + qk_rope_head_dim values per token per
layer) and attention runs against the latent with wkv_b folded into the query and
the output. The baseline is what a standard attention stack caches: per-head keys
[B, H, T, qk_head_dim] and values [B, H, T, v_head_dim] after wkv_b, with ordinary
scaled-dot-product attention. Both use the same weights, embedding, MLPs and head;
both caches start filled with the same `context` tokens (random latents, the
baseline's K/V expanded from them), and the first decoded logits are compared.

Per layer the cache ratio is H * (qk_nope + qk_rope + v) / (kv_lora_rank + qk_rope).
The absorbed path does more arithmetic per cached token (H * kv_lora_rank MACs for
scores plus as many for values) but reads H*(qk+v)/(C+R) times fewer bytes; decode
is bandwidth-bound, so the gap grows with the context. Times are medians per step.

    python benchmarks/decode.py [--contexts 256 1024 4096] [--batch 4] [--steps 16] [--dtype fp32] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from fractions import Fraction

import torch
import torch.nn.functional as F

import lm
from lm.rope import apply_rope


def build_model(dtype: torch.dtype, layers: int) -> lm.Transformer:
    cfg = lm.LMConfig(vocab_size=2048, hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
                      intermediate_size=2816, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=8192,
                      n_routed_experts=0, num_experts_per_tok=1, first_k_dense_replace=layers, num_nextn_predict_layers=0)
    return lm.Transformer(cfg).to(dtype).eval()


class ExpandedCache:
    """Per-layer k [B, H, S, qk_head_dim] and v [B, H, S, v_head_dim], as standard attention caches."""

    def __init__(self, model: lm.Transformer, batch: int, max_len: int, dtype: torch.dtype):
        c = model.cfg
        h = c.num_attention_heads
        self.k = [torch.zeros(batch, h, max_len, c.qk_head_dim, dtype=dtype) for _ in model.layers]
        self.v = [torch.zeros(batch, h, max_len, c.v_head_dim, dtype=dtype) for _ in model.layers]
        self.length = 0

    def bytes_per_token(self) -> int:
        return sum((k[0, :, 0].numel() + v[0, :, 0].numel()) * k.element_size() for k, v in zip(self.k, self.v))


def expand(attn: lm.MLA, kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent kv [B, T, C] and rotated k_pe [B, T, R] -> k [B, H, T, qk_head_dim], v [B, H, T, v_head_dim]."""
    b, t, _ = kv.shape
    kv = attn.wkv_b(kv).view(b, t, attn.n_heads, -1)
    k_nope, v = kv.split([attn.qk_nope_head_dim, attn.v_head_dim], dim=-1)
    k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, attn.n_heads, -1)], dim=-1)
    return k.transpose(1, 2), v.transpose(1, 2)


def expanded_attention(attn: lm.MLA, x, cos, sin, cache: ExpandedCache, i: int) -> torch.Tensor:
    """One decode step of layer i's MLA against the expanded cache (x [B, 1, D])."""
    b, t, _ = x.shape
    q = attn.wq_b(attn.q_norm(attn.wq_a(x))) if attn.q_lora_rank else attn.wq(x)
    q_nope, q_pe = q.view(b, t, attn.n_heads, -1).split([attn.qk_nope_head_dim, attn.qk_rope_head_dim], -1)
    q = torch.cat([q_nope, apply_rope(q_pe, cos, sin)], dim=-1).transpose(1, 2)
    kv, k_pe = attn.wkv_a(x).split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    k, v = expand(attn, attn.kv_norm(kv), apply_rope(k_pe, cos, sin))
    s = cache.length
    cache.k[i][:, :, s:s + t], cache.v[i][:, :, s:s + t] = k, v
    out = F.scaled_dot_product_attention(q, cache.k[i][:, :, :s + t], cache.v[i][:, :, :s + t],
                                         scale=attn.softmax_scale)  # one new token: it sees every cached one
    return attn.wo(out.transpose(1, 2).flatten(2))


def expanded_step(model: lm.Transformer, ids: torch.Tensor, cache: ExpandedCache) -> torch.Tensor:
    x = model.embed(ids)
    cos, sin = model.rope(torch.full(ids.shape, cache.length))
    for i, block in enumerate(model.layers):
        x = x + expanded_attention(block.attn, block.attn_norm(x), cos, sin, cache, i)
        x = x + block.ffn(block.ffn_norm(x))
    cache.length += ids.shape[1]
    return model.head(model.norm(x))


def fill(model: lm.Transformer, ours: lm.KVCache, base: ExpandedCache, context: int, batch: int, dtype) -> None:
    """Put the same `context` tokens in both caches: random latents, expanded for the baseline."""
    c = model.cfg
    for i, block in enumerate(model.layers):
        kv = torch.randn(batch, context, c.kv_lora_rank, dtype=dtype)
        pe = torch.randn(batch, context, c.qk_rope_head_dim, dtype=dtype)
        ours.layer(i).append(kv, pe)
        base.k[i][:, :, :context], base.v[i][:, :, :context] = expand(block.attn, kv, pe)
    base.length = context


def time_steps(step, steps: int, warmup: int) -> float:
    """Median seconds per decode step."""
    times = []
    for n in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if n >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def run(model, context: int, batch: int, steps: int, warmup: int, dtype) -> dict:
    ours = model.new_cache(batch, context + steps + warmup + 1, dtype=dtype)
    base = ExpandedCache(model, batch, context + steps + warmup + 1, dtype)
    fill(model, ours, base, context, batch, dtype)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, 1))
    diff = (model(ids, cache=ours).float() - expanded_step(model, ids, base).float()).abs().max().item()
    t_ours = time_steps(lambda: model(ids, cache=ours), steps, warmup)
    t_base = time_steps(lambda: expanded_step(model, ids, base), steps, warmup)
    return {"context": context, "absorbed_tok_s": batch / t_ours, "expanded_tok_s": batch / t_base,
            "speedup": t_base / t_ours, "first_logits_max_diff": diff,
            "absorbed_bytes_per_token": ours.bytes_per_token(), "expanded_bytes_per_token": base.bytes_per_token()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    model = build_model(dtype, args.layers)
    c = model.cfg
    rows = [run(model, n, args.batch, args.steps, args.warmup, dtype) for n in args.contexts]
    ratio = Fraction(rows[0]["expanded_bytes_per_token"], rows[0]["absorbed_bytes_per_token"])
    formula = Fraction(c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim),
                       c.kv_lora_rank + c.qk_rope_head_dim)
    assert ratio == formula, f"cache ratio {ratio} != H*(qk_nope+qk_rope+v)/(kv_lora_rank+qk_rope) = {formula}"
    print(f"{args.dtype}, batch {args.batch}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_attention_heads} heads, kv_lora_rank {c.kv_lora_rank}, {torch.get_num_threads()} threads")
    print(f"{'context':>8} {'absorbed tok/s':>15} {'expanded tok/s':>15} {'speedup':>8} {'max |dlogit|':>13}")
    for r in rows:
        print(f"{r['context']:>8} {r['absorbed_tok_s']:>15.1f} {r['expanded_tok_s']:>15.1f} "
              f"{r['speedup']:>7.2f}x {r['first_logits_max_diff']:>13.2e}")
    print(f"cache bytes/token: absorbed {rows[0]['absorbed_bytes_per_token']}, expanded "
          f"{rows[0]['expanded_bytes_per_token']} (ratio {float(ratio):.2f} = formula {float(formula):.2f})")
    print(json.dumps({"bench": "decode", "dtype": args.dtype, "batch": args.batch, "layers": c.num_hidden_layers,
                      "threads": torch.get_num_threads(),
                      "cache_ratio": float(ratio), "results": rows}))


if __name__ == "__main__":
    main()
