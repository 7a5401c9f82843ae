"""`mm shards synth|convert`: write webdataset tar shards of image-text samples.

Both writers produce the img2dataset layout the reader expects: per sample a
`__key__`, an image (`png`/`jpg`/`webp`), `txt` (the caption) and `json` (texts
keyed by task, plus what evaluation needs), shards named `{prefix}-000000.tar`,
and a `sizes.json` {shard file name: sample count} beside them that the reader
uses for the epoch length.

Shards are byte-for-byte reproducible: tar members carry a fixed mtime and
owner, JSON is written with sorted keys, PNG encoding is deterministic, and a
synthetic sample depends only on (split, seed, index), so the worker count does
not change the output. Each shard is written beside its final name and renamed
when complete, so a killed run never leaves a truncated shard under a real name.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from lm.hf import atomic_file
from train.data import scenes
from vision.preprocess import open_image_bytes

_EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # kept as they are; others become png
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _write_tar(path: str, samples: Iterable[dict]) -> int:
    """Write samples to `path` atomically; mtime 0 and a fixed owner make the bytes reproducible."""
    count = 0

    def write(tmp: str):
        nonlocal count
        with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, user="mm", group="mm") as tar:
            for sample in samples:
                tar.write(sample)
                count += 1

    atomic_file(path, write)
    return count


def _update_sizes(out: str, prefix: str, sizes: dict[str, int]) -> None:
    """Merge into out/sizes.json, replacing the entries of this prefix (other splits may share the dir)."""
    path = os.path.join(out, "sizes.json")
    merged = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            merged = json.load(f)
    own = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    merged = {k: v for k, v in merged.items() if not own.fullmatch(k)} | sizes
    text = json.dumps(dict(sorted(merged.items())), indent=1)
    atomic_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------- synthetic scenes

def synthetic_sample(split: str, seed: int, index: int) -> dict:
    scene = scenes.sample_scene(scenes.sample_rng(split, seed, index))
    png = io.BytesIO()
    scenes.render(scene).save(png, format="PNG")
    txt = scenes.all_texts(scene)
    meta = {**txt, "scene": scene.to_dict()}
    return {
        "__key__": f"{index:08d}",
        "png": png.getvalue(),
        "txt": txt["caption"].encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }


def _synth_shard(job: tuple) -> tuple[str, int]:
    out, split, seed, shard, start, stop = job
    name = shard_name(split, shard)
    count = _write_tar(os.path.join(out, name), (synthetic_sample(split, seed, i) for i in range(start, stop)))
    return name, count


def write_synthetic(out: str, n: int, seed: int, split: str = "train", per_shard: int = 1000,
                    workers: int = 1, progress: bool = False) -> list[str]:
    """Write n rendered scenes as `{split}-NNNNNN.tar` shards; returns the shard paths in order."""
    if n <= 0 or per_shard <= 0:
        raise ValueError(f"need n > 0 and per_shard > 0, got n={n}, per_shard={per_shard}")
    scenes.split_seed(split, seed)  # validates split and seed before any file is written
    os.makedirs(out, exist_ok=True)
    jobs = [(out, split, seed, s, start, min(start + per_shard, n)) for s, start in enumerate(range(0, n, per_shard))]
    sizes = {}
    with tqdm(total=n, unit="img", desc=f"synth {split}", disable=not progress, file=sys.stderr) as bar:
        if workers > 1 and len(jobs) > 1:
            with multiprocessing.get_context().Pool(min(workers, len(jobs))) as pool:
                for name, count in pool.imap_unordered(_synth_shard, jobs):
                    sizes[name] = count
                    bar.update(count)
        else:
            for job in jobs:
                name, count = _synth_shard(job)
                sizes[name] = count
                bar.update(count)
    _update_sizes(out, split, sizes)
    return [os.path.join(out, name) for name in sorted(sizes)]


# ---------------------------------------------------------------- converting a folder

def _caption_rows(images: str, captions: str | None) -> Iterator[tuple[str, str | None, str | None, tuple]]:
    """(row label, image path relative to `images`, caption, problem) from a jsonl/csv file or side .txt
    files; problem is () or (reason, detail)."""
    if captions is None:
        for root, dirs, files in os.walk(images):
            dirs.sort()
            for name in sorted(files):
                if not name.lower().endswith(_IMAGE_SUFFIXES):
                    continue
                rel = os.path.relpath(os.path.join(root, name), images)
                side = os.path.splitext(os.path.join(root, name))[0] + ".txt"
                if not os.path.exists(side):
                    yield rel, rel, None, ("missing caption", side)
                    continue
                with open(side, encoding="utf-8") as f:
                    yield rel, rel, f.read(), ()
    elif captions.endswith(".jsonl"):
        with open(captions, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    yield f"line {line_no}", str(row["path"]), row.get("caption"), ()
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    yield f"line {line_no}", None, None, ("bad row", f"need a JSON object with 'path' and 'caption': {e!r}")
    elif captions.endswith(".csv"):
        with open(captions, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not {"path", "caption"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{captions}: need columns 'path' and 'caption', found {reader.fieldnames}")
            for row in reader:
                yield f"line {reader.line_num}", row["path"], row["caption"], ()
    else:
        raise ValueError(f"--captions must be a .jsonl or .csv file, got {captions!r}")


def _image_entry(path: str, max_size: int | None) -> tuple[str, bytes, bool]:
    """(extension, bytes, resized): the original bytes unless the image must shrink or its format is unusual."""
    with open(path, "rb") as f:
        data = f.read()
    img = open_image_bytes(data)  # only the formats captioning decodes (no EPS, no Ghostscript)
    img.load()  # decode fully: a truncated file fails here, not in the training loop
    fmt = img.format
    too_big = max_size is not None and max(img.size) > max_size
    if not too_big and fmt in _EXT_OF_FORMAT:
        return _EXT_OF_FORMAT[fmt], data, False
    if too_big:
        img = ImageOps.exif_transpose(img)  # the re-encoded file drops EXIF, so apply its rotation now
        w, h = img.size
        scale = max_size / max(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    ext = _EXT_OF_FORMAT.get(fmt, "png")
    if ext == "jpg" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext], **({} if ext == "png" else {"quality": 95}))
    return ext, buf.getvalue(), too_big


def convert_folder(images: str, out: str, captions: str | None = None, per_shard: int = 1000,
                   max_size: int | None = None, prefix: str = "shard",
                   report: Callable[[str, str, str], None] | None = None, progress: bool = False) -> dict:
    """Pack a folder of images and their captions into shards. A bad row (reason "missing file",
    "not an image", "empty caption", "missing caption" or "bad row") is skipped, passed to
    `report(row, reason, detail)` and listed in stats["errors"] as (row, reason, detail)."""
    if not os.path.isdir(images):
        raise FileNotFoundError(f"--images: no such directory {images!r}")
    os.makedirs(out, exist_ok=True)
    stats = {"rows": 0, "written": 0, "resized": 0, "errors": [], "shards": []}

    def good_samples() -> Iterator[dict]:
        for row, rel, caption, problem in tqdm(_caption_rows(images, captions), unit="row", desc="convert",
                                               disable=not progress, file=sys.stderr):
            stats["rows"] += 1
            path = rel if rel is None or os.path.isabs(rel) else os.path.join(images, rel)
            if not problem and not os.path.isfile(path):
                problem = ("missing file", path)
            elif not problem and not (caption or "").strip():
                problem = ("empty caption", path)
            if not problem:
                try:
                    ext, data, resized = _image_entry(path, max_size)
                except (UnidentifiedImageError, OSError, ValueError) as e:
                    problem = ("not an image", f"{path}: {e}")
            if problem:
                stats["errors"].append((row, *problem))
                if report is not None:
                    report(row, *problem)
                continue
            stats["resized"] += resized
            key = f"{stats['written']:08d}"  # dots in a key would split it, so the source path goes into json
            stats["written"] += 1
            text = caption.strip()
            yield {"__key__": key, ext: data, "txt": text.encode("utf-8"),
                   "json": json.dumps({"caption": text, "source": rel}, ensure_ascii=False, sort_keys=True).encode("utf-8")}

    samples, sizes = good_samples(), {}
    while True:
        chunk = list(islice(samples, per_shard))
        if not chunk:
            break
        name = shard_name(prefix, len(sizes))
        sizes[name] = _write_tar(os.path.join(out, name), chunk)
    _update_sizes(out, prefix, sizes)
    stats["shards"] = [os.path.join(out, name) for name in sizes]
    return stats


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="shards_command", required=True, metavar="{synth,convert}")
    s = sub.add_parser("synth", help="render synthetic scenes with exact captions")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--n", type=int, required=True, help="number of samples")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--per-shard", type=int, default=1000)
    s.add_argument("--split", choices=scenes.SPLITS, default="train", help="also the shard name prefix")
    s.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    c = sub.add_parser("convert", help="pack a folder of images and captions")
    c.add_argument("--images", required=True, help="image directory")
    c.add_argument("--captions", default=None,
                   help="FILE.jsonl or FILE.csv with path,caption (paths relative to --images); "
                        "without it each image needs a same-named .txt beside it")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--per-shard", type=int, default=1000)
    c.add_argument("--max-size", type=int, default=None, help="re-encode images whose longer side exceeds this")
    c.add_argument("--prefix", default="shard", help="shard name prefix")


def run(args: argparse.Namespace) -> int:
    if args.shards_command == "synth":
        paths = write_synthetic(args.out, args.n, args.seed, args.split, args.per_shard, args.workers, progress=True)
        print(f"wrote {args.n} samples in {len(paths)} shards to {args.out}")
        return 0
    def report(row: str, reason: str, detail: str) -> None:
        tqdm.write(f"skipped {row}: {reason} ({detail})", file=sys.stderr)

    stats = convert_folder(args.images, args.out, args.captions, args.per_shard, args.max_size, args.prefix,
                           report=report, progress=True)
    skipped = len(stats["errors"])
    reasons = Counter(reason for _, reason, _ in stats["errors"])
    why = ", ".join(f"{r} {n}" for r, n in reasons.most_common()) if skipped else "none"
    print(f"converted {stats['written']} of {stats['rows']} rows into {len(stats['shards'])} shards in {args.out} "
          f"({stats['resized']} resized); skipped {skipped} ({why})")
    return 0 if stats["written"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mm shards", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
