"""Captioning a dataset: images/s over shards of photo-sized JPEGs, and peak memory vs job size.

Shards of `--images` JPEGs, 640-1024 px on the long side (a rendered scene scaled up, with
grain so the JPEG coder does real work, quality 90), captioned by the bundled model on
the CPU with the same options everywhere (`--batch-size`, greedy, no MTP drafts), in one
process that loaded the model once; each path is timed on its own, `--repeats` times,
taking turns:

- `one_process`: today's `mm caption SHARDS --out` loop (full JPEG decode on the main
  thread between model batches);
- `workers_0`: `--output-dir` with decoding inline (JPEG draft decode, `--workers 0`);
- `workers_1`, `workers_2`: the same with 1 and 2 decode processes (their start included);
- `ray_2_actors`: `--ray --actors 2` on a local Ray started once beforehand (each actor
  loads its own model: included, as a real job pays it);
- `model_only`: `Captioner.run` on tensors decoded and preprocessed beforehand: the
  ceiling, the model's own speed with the same threads.

Peak RSS: `mm caption --output-dir --workers 1` in a fresh process per count in
`--rss-counts` (the images are the same shards listed again under other names), the
largest RSS of the main process and of its decode worker, from `getrusage`.

    python benchmarks/bulk_caption.py [--images 256] [--per-shard 64] [--repeats 3] [--rss-counts 1000,3000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mm.bulk_caption import BulkJob, caption_units, plan  # noqa: E402
from mm.captioner import Captioner  # noqa: E402
from train.data.scenes import render, sample_rng, sample_scene  # noqa: E402


def photo_jpeg(i: int) -> bytes:
    rng = random.Random(i)
    side = rng.randint(640, 1024)
    img = render(sample_scene(sample_rng("test", 7, i))).resize((side, side * 3 // 4), Image.Resampling.BICUBIC)
    grain = np.random.default_rng(i).normal(0, 6, (img.height, img.width, 3))
    img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(root: Path, n: int, per_shard: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, n, per_shard):
        path = root / f"photos-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as tar:
            for i in range(s, min(n, s + per_shard)):
                tar.write({"__key__": f"{i:08d}", "jpg": photo_jpeg(i)})
        paths.append(str(path))
    return paths


class Args:  # what mm caption's parser gives the paths under test
    def __init__(self, **kw):
        self.__dict__.update(kw)


def one_process(cap, shards, options, batch_size, tmp: Path) -> None:
    from mm.caption_cli import caption_all

    with open(tmp / "one.jsonl", "wb") as out:
        caption_all(cap, Args(inputs=shards, task="caption", batch_size=batch_size), options, out)


def bulk(cap, shards, options, batch_size, tmp: Path, workers: int) -> None:
    out = tmp / f"w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    job = BulkJob(str(out), "jsonl", "caption", options, batch_size, workers)
    units, _ = plan(shards, job)
    summaries = caption_units(cap, units, job, report=lambda s: None)
    assert sum(s["captioned"] for s in summaries) == len(PREDECODED[id(shards)]), summaries  # every image


def on_ray(shards, options, batch_size, tmp: Path) -> None:
    from mm.ray_caption import caption_on_ray

    out = tmp / "ray"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    job = BulkJob(str(out), "jsonl", "caption", options, batch_size, 0)
    units, _ = plan(shards, job)
    args = Args(ray="", actors=2, gpus_per_actor=0.0, checkpoint=None, device="cpu", dtype=None)
    summaries = caption_on_ray(args, job, units)
    assert all(s["status"] == "done" for s in summaries), summaries


def model_only(cap, shards, options, batch_size) -> None:
    tensors = PREDECODED[id(shards)]
    for i in range(0, len(tensors), batch_size):
        cap.run(tensors[i : i + batch_size], **options)


PREDECODED: dict[int, list] = {}


def predecode(cap, shards) -> None:
    from mm.samples import DataErrors, sample_image, shard_samples

    PREDECODED[id(shards)] = [cap.transform(sample_image(s)) for u in shards for s in shard_samples(u, DataErrors())]


def peak_rss(shards: list[str], count: int, per_shard: int, tmp: Path, batch_size: int) -> dict:
    """A fresh `mm caption --output-dir --workers 1` over `count` images: its peak RSS, main and worker."""
    links = tmp / f"rss{count}"
    shutil.rmtree(links, ignore_errors=True)
    links.mkdir()
    for k in range(count // per_shard):
        os.symlink(shards[k % len(shards)], links / f"s-{k:06d}.tar")
    code = ("import resource, sys; from mm.cli import main; "
            f"rc = main(['caption', '{links}/s-{{000000..{count // per_shard - 1:06d}}}.tar', '--output-dir', "
            f"'{links}/out', '--workers', '1', '--batch-size', '{batch_size}', '--no-speculative']); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    main_kb, worker_kb = map(int, res.stdout.split()[-2:])
    return {"images": count // per_shard * per_shard, "main_mib": round(main_kb / 1024), "worker_mib": round(worker_kb / 1024),
            "seconds": round(time.perf_counter() - t0, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rss-counts", default="1000,3000")
    p.add_argument("--no-ray", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bulk_bench_"))
    shards = write_shards(tmp / "shards", args.images, args.per_shard)
    cap = Captioner.from_pretrained(device="cpu", batch_size=args.batch_size)
    options = dict(speculative=False)
    predecode(cap, shards)
    paths = {"one_process": lambda: one_process(cap, shards, options, args.batch_size, tmp),
             "workers_0": lambda: bulk(cap, shards, options, args.batch_size, tmp, 0),
             "workers_1": lambda: bulk(cap, shards, options, args.batch_size, tmp, 1),
             "workers_2": lambda: bulk(cap, shards, options, args.batch_size, tmp, 2),
             "model_only": lambda: model_only(cap, shards, options, args.batch_size)}
    if not args.no_ray:
        import ray

        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
        paths["ray_2_actors"] = lambda: on_ray(shards, options, args.batch_size, tmp)
    rates: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            rates[name].append(args.images / (time.perf_counter() - t0))
            print(f"{name}: {rates[name][-1]:.1f} img/s", file=sys.stderr)
    med = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    rss = [peak_rss(shards, int(c), args.per_shard, tmp, args.batch_size) for c in args.rss_counts.split(",")]
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"bench": "bulk_caption", "images": args.images, "threads": args.threads,
                      "batch_size": args.batch_size, "images_per_s_median": med,
                      "of_ceiling": {k: round(v / med["model_only"], 3) for k, v in med.items()},
                      "all_runs": {k: [round(x, 1) for x in v] for k, v in rates.items()}, "peak_rss": rss}))


if __name__ == "__main__":
    main()
