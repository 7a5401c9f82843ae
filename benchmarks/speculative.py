"""MTP self-speculative decoding vs plain greedy on the `describe` task.

Decodes the same images one at a time both ways (interleaved, so machine noise hits
both alike), checks the outputs are identical, and reports draft acceptance,
tokens per forward and the wall-clock speed-up (median of per-image ratios).

    python benchmarks/speculative.py [--checkpoint DIR] [--n 40] [--task describe] [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mm.captioner import Captioner
from mm.generate import GenerationConfig, GenerationStats
from train.data.scenes import render, sample_rng, sample_scene


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--task", default="describe")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="compile the decode step (both sides)")
    ap.add_argument("--draft-tokens", type=int, default=None,
                    help="drafts per verification (chained MTP; default: the model's trained depth)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cap = Captioner.from_pretrained(args.checkpoint, device="cpu", compile=args.compile)
    images = [render(sample_scene(sample_rng("test", 321, i))) for i in range(args.n)]
    spec = {"speculative": True, "draft_tokens": args.draft_tokens}
    cap.caption(images[0], task=args.task, **spec)  # warm-up (compiles the verification and draft steps)

    ratios, plain_t, spec_t = [], [], []
    plain_stats, spec_stats = GenerationStats(), GenerationStats()
    mismatches = 0
    for img in images:
        t0 = time.perf_counter()
        a = cap.run(img, task=args.task, speculative=False)
        t1 = time.perf_counter()
        b = cap.run(img, task=args.task, **spec)
        t2 = time.perf_counter()
        mismatches += a.texts != b.texts
        plain_t.append(t1 - t0)
        spec_t.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
        plain_stats.add(a.stats)
        spec_stats.add(b.stats)
    res = {
        "bench": "speculative", "task": args.task, "n": args.n, "identical_outputs": mismatches == 0,
        "mismatches": mismatches, "acceptance": round(spec_stats.acceptance or 0.0, 4),
        "tokens_per_forward_plain": round(plain_stats.tokens_per_forward, 3),
        "tokens_per_forward_speculative": round(spec_stats.tokens_per_forward, 3),
        "median_ms_plain": round(1000 * statistics.median(plain_t), 2),
        "median_ms_speculative": round(1000 * statistics.median(spec_t), 2),
        "speedup_median": round(statistics.median(ratios), 3), "threads": torch.get_num_threads(),
        "compiled": args.compile,
        "draft_tokens": GenerationConfig(draft_tokens=args.draft_tokens).drafts(cap.model),
    }
    print(f"{args.task}: acceptance {res['acceptance']:.3f}, tokens/forward {res['tokens_per_forward_plain']} -> "
          f"{res['tokens_per_forward_speculative']}, median {res['median_ms_plain']} ms -> "
          f"{res['median_ms_speculative']} ms (speed-up {res['speedup_median']}x), identical: {mismatches == 0}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
