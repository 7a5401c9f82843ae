"""Greedy decoding: lm.Decoder over the latent cache vs transformers' DeepseekV3ForCausalLM.generate.

Both sides get identical weights: our model is written with `lm.save_hf` and read back
by transformers' `from_pretrained`. For each config, prompt length and batch size the
two generate `--new` tokens greedily (no end token, so both produce the same count);
a logits processor timestamps transformers' steps, so the prefill and the decode are
timed apart on both sides. Decode tokens/s = batch * (new - 1) / decode time (the first
token comes from the prefill). Runs alternate between the two sides and the medians of
`--reps` runs are reported. A first pass in fp32 checks that the tokens are identical.

    python benchmarks/decode_hf.py [--configs bundled mid] [--prompts 32 2048] [--batches 1 8]
        [--new 64] [--reps 3] [--dtype bf16] [--compile] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

import lm
from lm.hf import save_hf

CONFIGS = {
    # the bundled model's language model (mm/default_model)
    "bundled": dict(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=768, q_lora_rank=0, kv_lora_rank=128, qk_nope_head_dim=32,
                    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1,
                    num_experts_per_tok=2, moe_intermediate_size=128),
    # DeepSeek-V3's proportions at a CPU-sized width
    "mid": dict(vocab_size=4096, hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
                intermediate_size=2816, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
                qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, n_shared_experts=2,
                num_experts_per_tok=6, moe_intermediate_size=256, n_group=8, topk_group=4,
                routed_scaling_factor=2.5),
}


def build(name: str, max_len: int, dtype: torch.dtype):
    """(ours, transformers') with the same weights in dtype, in eval mode."""
    import transformers

    cfg = lm.LMConfig(**CONFIGS[name], max_position_embeddings=max_len, first_k_dense_replace=1,
                      num_nextn_predict_layers=0)
    torch.manual_seed(0)
    ours = lm.Transformer(cfg)
    with torch.no_grad():  # a non-zero router bias, so both sides select through it
        for m in lm.moe_layers(ours):
            m.gate.bias.normal_(0, 0.01)
    with tempfile.TemporaryDirectory() as d:
        save_hf(ours, d)
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=dtype)
    return ours.to(dtype).eval(), theirs.eval()


@torch.inference_mode()
def ours_generate(dec: lm.Decoder, ids: torch.Tensor, new: int):
    """Greedy tokens [B, new], prefill seconds, decode seconds."""
    b, n = ids.shape
    cache = dec.new_cache(b, n + new)
    t0 = time.perf_counter()
    out = dec.prefill(dec.embed(ids), cache)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    toks = [tok]
    t1 = time.perf_counter()
    for p in range(n, n + new - 1):  # the decoder picks the shapes (one graph for every step when compiled)
        tok = dec.step(tok, cache, p).logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
    t2 = time.perf_counter()
    return torch.cat(toks, 1), t1 - t0, t2 - t1


class _Clock:
    """A logits processor that only records when each generation step reaches it."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


@torch.inference_mode()
def theirs_generate(model, ids: torch.Tensor, new: int):
    from transformers import LogitsProcessorList

    clock = _Clock()
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, eos_token_id=None, pad_token_id=0,
                         logits_processor=LogitsProcessorList([clock]))
    t_end = time.perf_counter()
    # step 1's processor call ends the prefill; the decode runs from there to the end
    return out[:, ids.shape[1]:], clock.times[0] - t0, t_end - clock.times[0]


def run_row(ours, theirs, dec, prompt: int, batch: int, new: int, reps: int) -> dict:
    ids = torch.randint(0, ours.cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(prompt))
    ours_generate(dec, ids[:, :8], 4)  # warm-up (kernel selection; compilation when compiled)
    theirs_generate(theirs, ids[:, :8], 4)
    ours_t, theirs_t = [], []
    for _ in range(reps):  # alternate, so both see the same machine load
        a, a_pre, a_dec = ours_generate(dec, ids, new)
        b, b_pre, b_dec = theirs_generate(theirs, ids, new)
        ours_t.append((a_pre, a_dec))
        theirs_t.append((b_pre, b_dec))
    steps = batch * (new - 1)
    ours_dec, theirs_dec = statistics.median(t[1] for t in ours_t), statistics.median(t[1] for t in theirs_t)
    return {"prompt": prompt, "batch": batch,
            "ours_decode_tok_s": steps / ours_dec, "theirs_decode_tok_s": steps / theirs_dec,
            "decode_speedup": theirs_dec / ours_dec,
            "ours_prefill_s": statistics.median(t[0] for t in ours_t),
            "theirs_prefill_s": statistics.median(t[0] for t in theirs_t),
            "token_agreement": float((a == b).float().mean())}


def check_fp32_tokens(name: str, new: int) -> bool:
    ours, theirs = build(name, 64 + new, torch.float32)
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    a, _, _ = ours_generate(lm.Decoder(ours), ids, new)
    b, _, _ = theirs_generate(theirs, ids, new)
    return bool(torch.equal(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["bundled", "mid"], choices=sorted(CONFIGS))
    ap.add_argument("--prompts", type=int, nargs="+", default=[32, 2048])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--compile", action="store_true", help="compile our decode step (torch.compile)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = []
    for name in args.configs:
        identical = check_fp32_tokens(name, args.new)
        ours, theirs = build(name, max(args.prompts) + args.new, dtype)
        dec = lm.Decoder(ours)
        if args.compile:
            dec.compile()
        for prompt in args.prompts:
            for batch in args.batches:
                r = {"config": name, "fp32_tokens_identical": identical, **run_row(ours, theirs, dec, prompt, batch,
                                                                                  args.new, args.reps)}
                rows.append(r)
                print(f"{name:8} prompt {prompt:5} batch {batch}: ours {r['ours_decode_tok_s']:8.1f} tok/s, "
                      f"transformers {r['theirs_decode_tok_s']:8.1f} tok/s, x{r['decode_speedup']:.2f}; prefill "
                      f"{r['ours_prefill_s'] * 1000:.0f} vs {r['theirs_prefill_s'] * 1000:.0f} ms; "
                      f"fp32 tokens identical: {identical}; bf16 agreement {r['token_agreement']:.2f}", flush=True)
    print(json.dumps({"bench": "decode_hf", "dtype": args.dtype, "compile": args.compile,
                      "threads": torch.get_num_threads(), "new_tokens": args.new, "rows": rows}))


if __name__ == "__main__":
    main()
