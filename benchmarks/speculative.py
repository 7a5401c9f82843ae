"""MTP self-speculative decoding vs plain greedy, per task.

Decodes the same images one at a time both ways (interleaved, so machine noise hits
both alike), checks the outputs are identical, and reports per task the draft
acceptance, drafts per round, tokens per forward and the wall-clock speed-up (median of
per-image ratios; the plain baseline runs in the same process, image by image).

    python benchmarks/speculative.py [--checkpoint DIR] [--n 40] [--tasks describe ...] [--compile]
        [--draft-tokens N] [--draft-min-prob P]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import mm.generate
from mm.captioner import Captioner
from mm.generate import GenerationConfig, GenerationStats
from train.data.scenes import render, sample_rng, sample_scene


def measure(cap: Captioner, images, task: str, spec: dict) -> dict:
    """Plain and speculative decoding of each image in turn; medians and the median ratio."""
    for img in images[:3]:  # warm-up (a compiled step compiles the shapes this task uses)
        cap.run(img, task=task, speculative=False)
        cap.run(img, task=task, **spec)
    ratios, plain_t, spec_t = [], [], []
    plain_stats, spec_stats = GenerationStats(), GenerationStats()
    mismatches = 0
    for img in images:
        t0 = time.perf_counter()
        a = cap.run(img, task=task, speculative=False)
        t1 = time.perf_counter()
        b = cap.run(img, task=task, **spec)
        t2 = time.perf_counter()
        mismatches += a.texts != b.texts
        plain_t.append(t1 - t0)
        spec_t.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
        plain_stats.add(a.stats)
        spec_stats.add(b.stats)
    rounds = spec_stats.forwards
    return {"task": task, "identical_outputs": mismatches == 0, "mismatches": mismatches,
            "acceptance": round(spec_stats.acceptance or 0.0, 4),
            "drafts_per_round": round(spec_stats.drafts / rounds, 3) if rounds else None,
            "tokens_per_forward_plain": round(plain_stats.tokens_per_forward, 3),
            "tokens_per_forward_speculative": round(spec_stats.tokens_per_forward, 3),
            "median_ms_plain": round(1000 * statistics.median(plain_t), 2),
            "median_ms_speculative": round(1000 * statistics.median(spec_t), 2),
            "speedup_median": round(statistics.median(ratios), 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--tasks", nargs="+", default=None, help="default: every task of the model")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="compile the decode step (both sides)")
    ap.add_argument("--draft-tokens", type=int, default=None,
                    help="most drafts per verification (chained MTP; default: the model's trained depth)")
    ap.add_argument("--draft-min-prob", type=float, default=None,
                    help=f"the chain stops after a draft below this probability (default {mm.generate.DRAFT_MIN_PROB})")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.draft_min_prob is not None:
        mm.generate.DRAFT_MIN_PROB = args.draft_min_prob
    cap = Captioner.from_pretrained(args.checkpoint, device="cpu", compile=args.compile)
    images = [render(sample_scene(sample_rng("test", 321, i))) for i in range(args.n)]
    spec = {"speculative": True, "draft_tokens": args.draft_tokens}
    rows = []
    for task in args.tasks or cap.tasks:
        r = measure(cap, images, task, spec)
        rows.append(r)
        print(f"{task}: acceptance {r['acceptance']:.3f}, drafts/round {r['drafts_per_round']}, tokens/forward "
              f"{r['tokens_per_forward_plain']} -> {r['tokens_per_forward_speculative']}, median "
              f"{r['median_ms_plain']} ms -> {r['median_ms_speculative']} ms (speed-up {r['speedup_median']}x), "
              f"identical: {r['identical_outputs']}", flush=True)
    print(json.dumps({"bench": "speculative", "n": args.n, "threads": torch.get_num_threads(),
                      "compiled": args.compile, "draft_min_prob": mm.generate.DRAFT_MIN_PROB,
                      "draft_tokens": GenerationConfig(draft_tokens=args.draft_tokens).drafts(cap.model),
                      "tasks": rows}))


if __name__ == "__main__":
    main()
