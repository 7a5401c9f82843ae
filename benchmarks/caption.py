"""Captioning speed of a checkpoint (default: the bundled model) on the CPU.

Single-image latency (p50/p95) with the prefill/decode split, and batched images/s,
on rendered test scenes. Prints a table and a final JSON line.

    python benchmarks/caption.py [--checkpoint DIR] [--n 40] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mm.captioner import Captioner
from train.scenes import render, sample_rng, sample_scene


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--n", type=int, default=40, help="images for the single-image latency")
    ap.add_argument("--task", default="caption")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cap = Captioner.from_pretrained(args.checkpoint, device="cpu")
    images = [render(sample_scene(sample_rng("test", 123, i))) for i in range(max(args.n, 64))]
    cap.caption(images[:2], task=args.task)  # warm-up (kernel selection)

    lat, prefill, decode = [], [], []
    for img in images[: args.n]:
        t0 = time.perf_counter()
        res = cap.run(img, task=args.task, speculative=False)
        lat.append(time.perf_counter() - t0)
        prefill.append(res.stats.prefill_s)
        decode.append(res.stats.decode_s)
    single = {"p50_ms": 1000 * percentile(lat, 0.5), "p95_ms": 1000 * percentile(lat, 0.95),
              "prefill_ms_median": 1000 * statistics.median(prefill),
              "decode_ms_median": 1000 * statistics.median(decode)}

    batched = {}
    for bs in (1, 8, 32, 64):
        cap.batch_size = bs
        t0 = time.perf_counter()
        cap.caption(images[:64], task=args.task, speculative=False)
        batched[bs] = 64 / (time.perf_counter() - t0)

    print(f"single image ({args.task}, greedy, n={args.n}): p50 {single['p50_ms']:.1f} ms, "
          f"p95 {single['p95_ms']:.1f} ms; prefill {single['prefill_ms_median']:.1f} ms, "
          f"decode {single['decode_ms_median']:.1f} ms (medians)")
    print("| batch size | images/s |\n|---|---|")
    for bs, ips in batched.items():
        print(f"| {bs} | {ips:.1f} |")
    print(json.dumps({"bench": "caption", "task": args.task, "threads": torch.get_num_threads(), **single,
                      "images_per_s": {str(k): round(v, 2) for k, v in batched.items()}}))


if __name__ == "__main__":
    main()
