"""Training speed: lm.Transformer vs transformers' DeepseekV3ForCausalLM, same config and weights.

Our model is built, written with `lm.hf.save_hf` and read back by transformers'
`from_pretrained`, so both start from identical weights (the first losses are
printed side by side as a check). A step is forward + next-token cross-entropy +
backward + AdamW on the CPU, with fp32 master weights under bf16 autocast (or bf16
weights). MTP is off (transformers trains no MTP module) and so are the balance
losses. Transformers runs with its default experts implementation (grouped_mm in
5.x) and SDPA attention unless told otherwise; the table names them. Steps
alternate between the two models so both see the same machine load, and tokens/s
come from the median step after --warmup steps.

    python benchmarks/lm_train.py [--batch 4] [--seq 256] [--steps 7] [--warmup 2] [--threads N]
        [--weights fp32|bf16] [--transformers-experts eager|grouped_mm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import lm
from lm.hf import save_hf


def build_config() -> lm.LMConfig:
    """DeepSeek-V3's proportions scaled down: fine-grained experts (64, top-6, 8 groups keep 4)."""
    return lm.LMConfig(vocab_size=2048, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                       intermediate_size=1408, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64,
                       qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=1024,
                       n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=128,
                       first_k_dense_replace=1, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                       num_nextn_predict_layers=0, aux_loss_alpha=0.0)


def build_models(cfg: lm.LMConfig, dtype: torch.dtype = torch.float32, experts: str | None = None):
    """(ours, transformers') with the same weights in `dtype`, in train mode; `experts` picks
    transformers' experts implementation (None: its default)."""
    import transformers

    ours = lm.Transformer(cfg)
    with torch.no_grad():  # a non-zero router bias so both sides route through it
        for m in lm.moe_layers(ours):
            m.gate.bias.normal_(0, 0.01)
    with tempfile.TemporaryDirectory() as d:
        save_hf(ours, d)
        extra = {"experts_implementation": experts} if experts else {}
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=dtype, **extra)
    return ours.to(dtype).train(), theirs.train()


def our_logits(model, ids):
    return model(ids)


def their_logits(model, ids):
    return model(ids).logits


def train_step(model, logits_fn, optimizer, ids) -> float:
    # autocast is a no-op for bf16 weights; for fp32 weights it runs the matmuls in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = logits_fn(model, ids)
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def measure(runs: dict, batches, warmup: int) -> dict:
    """name -> (median seconds per step, first loss). Steps alternate between the models so
    both see the same machine load (the CPU may be shared)."""
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, (model, _) in runs.items()}
    times = {name: [] for name in runs}
    first = {}
    for i, ids in enumerate(batches):
        for name, (model, logits_fn) in runs.items():
            t0 = time.perf_counter()
            loss = train_step(model, logits_fn, optimizers[name], ids)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
            first.setdefault(name, loss)
    return {name: (statistics.median(times[name]), first[name]) for name in runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--weights", choices=["fp32", "bf16"], default="fp32",
                    help="fp32 master weights under bf16 autocast, or bf16 weights")
    ap.add_argument("--transformers-experts", default=None, help="e.g. eager, grouped_mm (default: its own)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = build_config()
    dtype = torch.float32 if args.weights == "fp32" else torch.bfloat16
    ours, theirs = build_models(cfg, dtype, args.transformers_experts)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq)) for _ in range(args.warmup + args.steps)]
    results = measure({"transformers": (theirs, their_logits), "lm": (ours, our_logits)}, batches, args.warmup)
    (t_theirs, loss_theirs), (t_ours, loss_ours) = results["transformers"], results["lm"]
    tokens = args.batch * args.seq
    experts = getattr(theirs.config, "_experts_implementation", "?")
    attn = getattr(theirs.config, "_attn_implementation", "?")
    print(f"{args.weights} weights, bf16 autocast, AdamW, {tokens} tokens/step, {torch.get_num_threads()} threads; "
          f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts top-"
          f"{cfg.num_experts_per_tok}; transformers experts={experts}, attention={attn}")
    print(f"{'model':<14} {'s/step':>8} {'tokens/s':>10} {'first loss':>11}")
    print(f"{'transformers':<14} {t_theirs:>8.3f} {tokens / t_theirs:>10.0f} {loss_theirs:>11.4f}")
    print(f"{'lm':<14} {t_ours:>8.3f} {tokens / t_ours:>10.0f} {loss_ours:>11.4f}")
    print(f"speedup {t_theirs / t_ours:.2f}x")
    print(json.dumps({"bench": "lm_train", "weights": args.weights, "tokens_per_step": tokens, "threads": torch.get_num_threads(),
                      "transformers_experts": experts, "transformers_attention": attn,
                      "ours_tok_s": tokens / t_ours, "transformers_tok_s": tokens / t_theirs,
                      "speedup": t_theirs / t_ours, "first_loss": {"ours": loss_ours, "transformers": loss_theirs}}))


if __name__ == "__main__":
    main()
