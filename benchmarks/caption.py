"""Captioning speed of a checkpoint (default: the bundled model) on the CPU, per decode path.

Paths, all in one process on the same images: `reference` (the reference absorbed path
through `Transformer.forward`, what decoding ran on before `lm.Decoder`), `fast` (the
eager `lm.Decoder`) and, with --compile, `compiled` (its torch.compile'd step; the
warm-up time is printed). For each: single-image latency p50/p95 with the
prefill/decode split (the paths take turns image by image, so machine noise hits them
alike), batched images/s (medians of 3 interleaved rounds), and the aten op calls of one decode forward (torch.profiler,
every op the dispatcher saw, nested ones included). Prints tables and a final JSON line.

    python benchmarks/caption.py [--checkpoint DIR] [--n 40] [--threads N] [--dtype fp32|bf16] [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import lm
from lm import Reference
from mm.captioner import Captioner
from train.data.scenes import render, sample_rng, sample_scene


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


@torch.inference_mode()
def ops_per_decode_forward(cap: Captioner, decoder) -> int:
    """Aten op calls of one one-token forward at batch 1, 16 tokens into the sequence."""
    cache = decoder.new_cache(1, 64)
    decoder.prefill(decoder.embed(torch.arange(16)[None]), cache)
    ids = torch.tensor([[cap.tokenizer.eos_id]])
    for _ in range(2):  # warm (and, when compiled, compile) before counting
        decoder.step(ids, cache, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decoder.step(ids, cache, 16)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--n", type=int, default=40, help="images for the single-image latency")
    ap.add_argument("--task", default="caption")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", default=None, help="fp32 or bf16 (default: the checkpoint's)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--compile", action="store_true", help="also measure the compiled decode step")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cap = Captioner.from_pretrained(args.checkpoint, device="cpu", dtype=args.dtype)
    paths = {"reference": Reference(cap.model.lm), "fast": cap.decoder}
    compile_s = None
    if args.compile:
        cap.decoder = lm.Decoder(cap.model.lm)
        compile_s = cap.compile()
        paths["compiled"] = cap.decoder
    images = [render(sample_scene(sample_rng("test", 123, i))) for i in range(max(args.n, max(args.batch_sizes)))]
    texts = {}
    for name, dec in paths.items():  # warm-up (kernel selection); the outputs must agree
        cap.decoder = dec
        texts[name] = cap.caption(images[:8], task=args.task, speculative=False)
    agree = all(t == texts["reference"] for t in texts.values())

    lat = {k: [] for k in paths}
    prefill = {k: [] for k in paths}
    decode = {k: [] for k in paths}
    for img in images[: args.n]:
        for name, dec in paths.items():
            cap.decoder = dec
            t0 = time.perf_counter()
            res = cap.run(img, task=args.task, speculative=False)
            lat[name].append(time.perf_counter() - t0)
            prefill[name].append(res.stats.prefill_s)
            decode[name].append(res.stats.decode_s)

    n = max(args.batch_sizes)
    batched = {name: {} for name in paths}
    for bs in args.batch_sizes:  # paths take turns, 3 rounds, medians: machine noise hits all alike
        cap.batch_size = bs
        times = {name: [] for name in paths}
        for rnd in range(4):
            for name, dec in paths.items():
                cap.decoder = dec
                t0 = time.perf_counter()
                cap.caption(images[:n] if rnd else images[:bs], task=args.task, speculative=False)
                if rnd:  # round 0 warms up (a compiled path compiles this batch size)
                    times[name].append(time.perf_counter() - t0)
        for name in paths:
            batched[name][str(bs)] = round(n / statistics.median(times[name]), 2)
    rows = {}
    for name, dec in paths.items():
        rows[name] = {"p50_ms": 1000 * percentile(lat[name], 0.5), "p95_ms": 1000 * percentile(lat[name], 0.95),
                      "prefill_ms_median": 1000 * statistics.median(prefill[name]),
                      "decode_ms_median": 1000 * statistics.median(decode[name]),
                      "aten_ops_per_decode_forward": ops_per_decode_forward(cap, dec),
                      "images_per_s": batched[name]}

    print(f"{args.task}, greedy, n={args.n}, {torch.get_num_threads()} threads, "
          f"{next(cap.model.parameters()).dtype}; outputs identical across paths: {agree}")
    sizes = args.batch_sizes
    print("| path | p50 ms | p95 ms | prefill ms | decode ms | aten ops / decode forward | "
          + " | ".join(f"images/s @{b}" for b in sizes) + " |")
    print("|---" * (6 + len(sizes)) + "|")
    for name, r in rows.items():
        print(f"| {name} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['prefill_ms_median']:.1f} | "
              f"{r['decode_ms_median']:.1f} | {r['aten_ops_per_decode_forward']} | "
              + " | ".join(f"{r['images_per_s'][str(b)]:.1f}" for b in sizes) + " |")
    ref = rows["reference"]
    for name in rows:
        if name != "reference":
            r = rows[name]
            print(f"{name} vs reference: p50 x{ref['p50_ms'] / r['p50_ms']:.2f}, batch {sizes[-1]} x"
                  f"{r['images_per_s'][str(sizes[-1])] / ref['images_per_s'][str(sizes[-1])]:.2f}")
    print(json.dumps({"bench": "caption", "task": args.task, "threads": torch.get_num_threads(),
                      "dtype": str(next(cap.model.parameters()).dtype), "identical_outputs": agree,
                      "compile_s": compile_s, "paths": rows}))


if __name__ == "__main__":
    main()
