"""Reader throughput: samples/s of `train.data.make_loader` with 0, 1 and 2 DataLoader workers.

Writes --n synthetic scenes to a temporary directory (timing the shard writer too),
then reads one full epoch per worker count: tar parsing, PNG decode, the image
transform (uint8 PIL -> normalised float tensor), tokenisation into the
`<bos> <image>*N prompt caption <eos>` layout with labels, one task per batch,
fixed padding per task, and collation. 0 workers (everything in the main process)
is the baseline. Epoch time includes starting the workers, as a training loop pays it;
the fastest of --repeats epochs is kept, since a shared machine's load adds noise.

The main process's torch threads are set with --threads (default 1): on a small
shared CPU box, intra-op threads of tiny tensor ops contend with the workers and
with each other, which would measure the machine's load rather than the reader.

--train-step-images-per-s is the place for the trainer's measured consumption
rate: given it, the table says whether each reader configuration keeps up.

    python benchmarks/data.py [--n 4000] [--batch-size 32] [--workers 0 1 2] [--train-step-images-per-s X]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after the tokenizer is used

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lm.loss import IGNORE_INDEX  # noqa: E402
from mm.config import DEFAULT_TASKS  # noqa: E402
from train.data import scenes  # noqa: E402
from train.data.reader import make_loader  # noqa: E402
from train.data.shards import write_synthetic  # noqa: E402

IMAGE_TOKENS = 16  # the CPU recipe's pooled 4x4 map (NOTES.md)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def transform(pil) -> torch.Tensor:
    return (torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255 - MEAN) / STD


class Encoder:
    """mm's byte-level BPE when it is available, else raw UTF-8 bytes with the same layout."""

    def __init__(self, texts: list[str]):
        try:
            from mm.tokenizer import Tokenizer
            self.tok, self.name = Tokenizer.train(texts, vocab_size=512), "mm.tokenizer bpe-512"
        except ImportError:
            self.tok, self.name = None, "utf-8 bytes"

    def __call__(self, task: str, text: str) -> tuple[list[int], list[int]]:
        if self.tok is not None:
            return self.tok.build_example(DEFAULT_TASKS[task], text, IMAGE_TOKENS)
        prefix = [0] + [3] * IMAGE_TOKENS + [4 + b for b in DEFAULT_TASKS[task].encode()]
        target = [4 + b for b in text.encode()] + [1]
        return prefix + target, [IGNORE_INDEX] * len(prefix) + target


def read_epoch(urls: str, encode: Encoder, pad_to: dict, batch_size: int, workers: int,
               repeats: int) -> tuple[int, float, str]:
    """Samples in one epoch, the fastest of `repeats` epochs in seconds, and the error summary."""
    loader = make_loader(urls, encode=encode, image_transform=transform, batch_size=batch_size,
                         num_workers=workers, pad_to=pad_to, drop_last=False, seed=0)
    best = float("inf")
    for epoch in range(repeats):
        loader.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += batch["images"].shape[0]
        best = min(best, time.perf_counter() - t0)
    return n, best, loader.errors.summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="epochs per worker count; the fastest counts")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    ap.add_argument("--train-step-images-per-s", type=float, default=None,
                    help="the trainer's consumption rate, to compare the reader against")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = write_synthetic(tmp, args.n, seed=0, per_shard=args.per_shard, workers=2)
        synth_rate = args.n / (time.perf_counter() - t0)
        urls = os.path.join(tmp, f"train-{{000000..{len(paths) - 1:06d}}}.tar")
        sample = [scenes.texts(scenes.sample_scene(scenes.sample_rng("train", 0, i))) for i in range(2000)]
        encode = Encoder([t for s in sample for t in s.values()])
        pad_to = {task: max(len(encode(task, s[task])[0]) for s in sample) + 8 for task in scenes.TASKS}

        rates = {}
        print(f"reader, {args.n} synthetic samples in {len(paths)} shards, batch {args.batch_size}, "
              f"tokenizer {encode.name}, main-process torch threads {args.threads}, best of {args.repeats} epochs, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"{'workers':>7} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'vs 0':>6}  keeps up")
        for w in args.workers:
            n, secs, errors = read_epoch(urls, encode, pad_to, args.batch_size, w, args.repeats)
            rates[str(w)] = n / secs
            base = rates.get(str(args.workers[0]), rates[str(w)])
            keeps_up = "-" if args.train_step_images_per_s is None else \
                ("yes" if rates[str(w)] >= args.train_step_images_per_s else "no")
            print(f"{w:>7} {n:>8} {secs:>8.2f} {rates[str(w)]:>10.0f} {rates[str(w)] / base:>5.2f}x  {keeps_up}  ({errors})")
    print(f"shard writer: {synth_rate:.0f} samples/s (2 processes)")
    print(json.dumps({"bench": "data", "n": args.n, "batch_size": args.batch_size, "threads": args.threads,
                      "load_average": round(os.getloadavg()[0], 2),
                      "tokenizer": encode.name, "synth_samples_per_s": round(synth_rate, 1),
                      "reader_samples_per_s": {k: round(v, 1) for k, v in rates.items()},
                      "train_step_images_per_s": args.train_step_images_per_s}))


if __name__ == "__main__":
    main()
