"""MTP self-speculative decoding vs plain greedy, per task.

Decodes the same images one at a time both ways (interleaved, each way first on every
other image, so machine noise and order hit both alike), checks the outputs are identical,
and reports per task the draft acceptance, drafts per round, tokens per forward and the
wall-clock speed-up (median of per-image ratios; the plain baseline runs in the same
process, image by image).

The speculative side is what a Captioner does by default: its DraftPolicy drafts for a task
as deep as has measured fastest per token there (0, the trained chain or twice it;
mm/draft_policy.py), trying each depth on a task's first requests (8 of them for the bundled
model here, where the plain side's runs count for depth 0), so `requests by depth` counts
the measured requests per depth; `--warmup 10` leaves that exploration out of the figures. `--draft-tokens N` drafts N deep
on every request instead. `--costs` also times the decoder's entry points on one image per
task (a main step over 1 and over depth + 1 tokens, one draft step; depth: --draft-tokens,
else the deepest the policy tries) and prints what a round of drafts costs in plain steps:
the speed-up decoding could reach if every draft were accepted and those were all it cost.

    python benchmarks/speculative.py [--checkpoint DIR] [--n 40] [--tasks describe ...] [--compile]
        [--draft-tokens N] [--draft-min-prob P] [--warmup 3] [--costs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import mm.generate
from mm.captioner import Captioner
from mm.draft_policy import depths
from mm.generate import GenerationConfig, GenerationStats
from train.data.scenes import render, sample_rng, sample_scene


def measure(cap: Captioner, images, task: str, spec: dict, warmup: int) -> dict:
    """Plain and speculative decoding of each image in turn; medians and the median ratio."""
    for img in (images * warmup)[:warmup]:  # a compiled step compiles the shapes this task uses; the policy explores
        cap.run(img, task=task, speculative=False)
        cap.run(img, task=task, **spec)
    ratios, plain_t, spec_t, depths = [], [], [], {}
    plain_stats, spec_stats = GenerationStats(), GenerationStats()
    mismatches = 0
    for i, img in enumerate(images):
        runs = {}
        for side in ((False, True) if i % 2 == 0 else (True, False)):  # each side first on every other image
            t0 = time.perf_counter()
            result = cap.run(img, task=task, **(spec if side else {"speculative": False}))
            runs[side] = result, time.perf_counter() - t0
        (a, a_s), (b, b_s) = runs[False], runs[True]
        mismatches += a.texts != b.texts
        depths[b.stats.depth] = depths.get(b.stats.depth, 0) + 1
        plain_t.append(a_s)
        spec_t.append(b_s)
        ratios.append(a_s / b_s)
        plain_stats.add(a.stats)
        spec_stats.add(b.stats)
    rounds = spec_stats.forwards
    return {"task": task, "identical_outputs": mismatches == 0, "mismatches": mismatches,
            "requests_by_depth": dict(sorted(depths.items())),
            "acceptance": round(spec_stats.acceptance or 0.0, 4),
            "drafts_per_round": round(spec_stats.drafts / rounds, 3) if rounds else None,
            "tokens_per_forward_plain": round(plain_stats.tokens_per_forward, 3),
            "tokens_per_forward_speculative": round(spec_stats.tokens_per_forward, 3),
            "median_ms_plain": round(1000 * statistics.median(plain_t), 2),
            "median_ms_speculative": round(1000 * statistics.median(spec_t), 2),
            "speedup_median": round(statistics.median(ratios), 3)}


def entry_point_costs(cap: Captioner, image, task: str, depth: int, reps: int = 50) -> dict:
    """Median ms of the decoder's entry points after this image's prefill: a main step over 1
    and over depth + 1 tokens, and one chained draft step; and what a round of `depth` drafts
    costs in plain steps."""
    dec = cap.decoder

    def median_ms(fn):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    with torch.inference_mode():
        image_embeds, _ = cap.model.encode(cap.pixels([image]))
        embeds = cap.model.embed(cap.prefix(task), image_embeds)
        n = embeds.shape[1]
        cache = dec.new_cache(1, n + depth + 1)
        out = dec.prefill(embeds, cache)
        ids = torch.randint(0, cap.model.cfg.lm.vocab_size, (1, depth + 1))
        step = median_ms(lambda: int(dec.step(ids[:, :1], cache, n).logits[0, -1].argmax()))
        verify = median_ms(lambda: int(dec.step(ids, cache, n).logits[0, -1].argmax()))
        draft = median_ms(lambda: int(dec.draft(out.hidden[:, -1:], ids[:, :1], cache, n).tokens[0]))
    round_steps = (verify + depth * draft) / step
    return {"step_ms": round(step, 3), f"step_{depth + 1}_tokens_ms": round(verify, 3), "draft_ms": round(draft, 3),
            "round_in_plain_steps": round(round_steps, 2), "speedup_if_all_accepted": round((depth + 1) / round_steps, 2)}


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
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured requests per task and side first")
    ap.add_argument("--costs", action="store_true", help="also time the decoder's entry points (see above)")
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
        r = measure(cap, images, task, spec, args.warmup)
        if args.costs:
            trained = GenerationConfig(draft_tokens=args.draft_tokens).drafts(cap.model)
            r["costs"] = entry_point_costs(cap, images[0], task, args.draft_tokens or max(depths(trained)))
        rows.append(r)
        print(f"{task}: requests by depth {r['requests_by_depth']}, acceptance {r['acceptance']:.3f}, drafts/round "
              f"{r['drafts_per_round']}, tokens/forward {r['tokens_per_forward_plain']} -> "
              f"{r['tokens_per_forward_speculative']}, median {r['median_ms_plain']} ms -> "
              f"{r['median_ms_speculative']} ms (speed-up {r['speedup_median']}x), identical: "
              f"{r['identical_outputs']}" + (f", costs {r['costs']}" if args.costs else ""), flush=True)
    print(json.dumps({"bench": "speculative", "n": args.n, "warmup": args.warmup, "threads": torch.get_num_threads(),
                      "compiled": args.compile, "draft_min_prob": mm.generate.DRAFT_MIN_PROB,
                      "draft_tokens": GenerationConfig(draft_tokens=args.draft_tokens).drafts(cap.model),
                      "tasks": rows}))


if __name__ == "__main__":
    main()
