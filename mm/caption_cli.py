"""`mm caption`: caption files, folders, globs and webdataset shards to JSONL.

One JSON line per captioned image (`{"path"|"key", "caption", "task", "confidence",
"unfamiliar"}`) goes to stdout or `--out`. `confidence` is in [0, 1] (mm/confidence.py);
`unfamiliar` is true when it is below the model's calibrated threshold, i.e. the image
looks unlike anything the model was trained on (always false for an uncalibrated model); a progress bar goes to stderr. An unreadable or non-image input
is reported with its path and the reason and skipped, and so is a shard that cannot
be read or breaks partway (its samples after the break are lost: that shard counts as
one failure). Shard samples are read by the same rules as training (`mm/samples.py`).
The exit status is the number of inputs that failed (capped at 255), 0 when all went
well, 2 for bad options or a bad checkpoint (nothing is captioned), and 141 (as for
SIGPIPE) when the reader of stdout goes away, e.g. `mm caption ... | head -1`.

With `--output-dir` or `--write-txt` it captions a dataset instead: one output per shard,
resumable, decoded in worker processes, optionally on Ray (mm/bulk_caption.py). Every
output path is checked before the model loads: a bad one is exit 2 and no work.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from mm.shard_outputs import json_line

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SHARD_HINTS = (".tar", ".tar.gz", ".tgz")


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("inputs", nargs="+", help="image files, directories, globs, or webdataset shard URLs")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the bundled model)")
    p.add_argument("--task", default="caption", help="caption, describe, caption_zh, describe_zh, ...")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="write JSONL here instead of stdout")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-speculative", action="store_true", help="plain greedy decoding (no MTP drafts)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (pays off on large jobs; see README)")
    p.add_argument("--draft-tokens", type=int, default=None,
                   help="MTP drafts verified per forward on every image (above 1 the MTP module is chained "
                        "on itself; default: per task, none, the depth the model's MTP was trained to or twice "
                        "it, whichever measures fastest here; a batch decodes together without drafts)")
    bulk = p.add_argument_group("captioning a dataset (README: Captioning a dataset)")
    bulk.add_argument("--output-dir", default=None,
                      help="one output per input shard (or folder), named after it; a rerun skips complete ones")
    bulk.add_argument("--format", choices=["jsonl", "parquet", "wds"], default="jsonl",
                      help="with --output-dir: JSONL lines, a Parquet table of the same columns, or a copy of "
                           "the shard with a <task>.txt member per sample")
    bulk.add_argument("--write-txt", action="store_true", help="write each caption beside its image, <stem>.txt")
    bulk.add_argument("--caption-extension", default=".txt", help="with --write-txt: the caption file's extension")
    bulk.add_argument("--prefix", default="", help="text put before every caption written (e.g. a trigger word)")
    bulk.add_argument("--suffix", default="", help="text put after every caption written")
    bulk.add_argument("--overwrite", action="store_true", help="redo complete outputs and existing caption files")
    bulk.add_argument("--workers", type=int, default=default_workers(),
                      help="processes decoding and preprocessing images (0: in the main process; "
                           "default: %(default)s here)")
    bulk.add_argument("--full-decode", action="store_true",
                      help="decode JPEGs at full size (default: at the smallest DCT scale still >= 2x the "
                           "encoder's input, ~10x less work; the pixels differ slightly)")
    bulk.add_argument("--num-shards", type=int, default=None, help="split the job into K parts ...")
    bulk.add_argument("--shard-index", type=int, default=None, help="... and do part I (0..K-1) here")
    bulk.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                      help="run on Ray Data: a local Ray, or the cluster at ADDRESS (pip install 'mm-captioner[ray]')")
    bulk.add_argument("--actors", type=int, default=1, help="with --ray: captioner actors (model copies)")
    bulk.add_argument("--gpus-per-actor", type=float, default=0.0, help="with --ray: GPUs each actor holds")


def default_workers() -> int:
    # Two cores stay with the model's threads: on 2 cores a decode process only competes with them
    # (BENCHMARKS.md: 78 img/s with one worker, 104 decoding inline); beyond 4 the model is the bottleneck.
    return max(0, min(4, (os.cpu_count() or 1) - 2))


def is_shard(spec: str) -> bool:
    return spec.startswith(("http://", "https://")) or spec.endswith(SHARD_HINTS)


def expand(inputs: list[str]) -> Iterator[tuple[str, str]]:
    """('file', path) for images (folders recursively, globs expanded), ('shard', url), and
    ('shards', pattern) for a brace pattern of shards. A name that exists is taken literally,
    whatever characters it holds (a file named `pipe:...` or `a::{0..9}.tar` is a file); nothing
    an argument says is ever run (mm/samples.py opens shards without a shell)."""
    for spec in inputs:
        if Path(spec).is_file():
            yield ("shard" if is_shard(spec) else "file"), spec
        elif is_shard(spec) and (spec.startswith(("http://", "https://")) or not any(c in spec for c in "*?[")):
            yield "shards", spec  # a local `*.tar` glob is globbed below
        elif Path(spec).is_dir():
            for p in sorted(Path(spec).rglob("*")):
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                    yield "file", str(p)
        elif any(c in spec for c in "*?[") and not Path(spec).exists():
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                yield "missing", spec
            yield from ((("shard" if is_shard(m) else "file"), m) for m in matches if Path(m).is_file())
        else:
            yield "file", spec


def shard_items(url: str) -> Iterator[tuple[dict, object]]:
    """One shard's (record, sample) pairs, then ({"url"}, OSError) if it cannot be read to its end."""
    from mm.samples import DataErrors, shard_samples

    broken = DataErrors()
    for sample in shard_samples(url, broken):
        yield {"key": sample["__key__"], "url": url}, sample
    for e in broken.examples:
        where = f"broken after member {e['key']}; the rest of it is lost" if e["key"] else "cannot be read"
        yield {"url": url}, OSError(f"shard {where} ({e['detail']})")


def items(inputs: list[str]) -> Iterator[tuple[dict, object]]:
    """(record, image source) pairs: a path, a shard sample (dict), or an Exception saying why not."""
    for kind, spec in expand(inputs):
        if kind == "missing":
            yield {"path": spec}, FileNotFoundError("the pattern matches no file")
        elif kind == "file":
            yield {"path": spec}, spec
        else:
            from mm.samples import expand_urls

            for url in (expand_urls(spec) if kind == "shards" else [spec]):
                yield from shard_items(url)


def check_args(args) -> dict:
    """The generation options, after every option is checked; raises ValueError naming the bad one."""
    from mm.generate import GenerationConfig

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    options = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, temperature=args.temperature,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                   speculative=not args.no_speculative, draft_tokens=args.draft_tokens)
    GenerationConfig(**options).validate()
    return options


def check_output_dir(path: str) -> None:
    """`--output-dir` is created if missing; it must end up a writable directory."""
    from mm.checkpoint import check_writable_dir

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--output-dir {path} is a file, not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output-dir {path} cannot be created ({e.strerror or e})") from None
    check_writable_dir(p, f"--output-dir {path}")


def check_bulk(args, options: dict):
    """None for a plain `--out`/stdout job; else (BulkJob, units to do, units already complete).
    Raises ValueError naming the bad option or input; nothing is written but --output-dir."""
    from mm.bulk_caption import BulkJob, plan

    if args.output_dir is None and not args.write_txt:
        for flag, value in (("--num-shards", args.num_shards), ("--ray", args.ray)):
            if value is not None:
                raise ValueError(f"{flag} needs --output-dir (or --write-txt)")
        return None
    if args.out is not None or (args.output_dir is not None and args.write_txt):
        raise ValueError("choose one of --out, --output-dir and --write-txt")
    if (args.num_shards is None) != (args.shard_index is None):
        raise ValueError("--num-shards and --shard-index go together")
    k, i = args.num_shards or 1, args.shard_index or 0
    if k < 1 or not 0 <= i < k:
        raise ValueError(f"--shard-index must be in 0..{k - 1} and --num-shards >= 1, got {i} and {k}")
    if args.workers < 0 or args.actors < 1 or args.gpus_per_actor < 0:
        raise ValueError("--workers must be >= 0, --actors >= 1 and --gpus-per-actor >= 0")
    ext = args.caption_extension if args.caption_extension.startswith(".") else "." + args.caption_extension
    if "/" in ext or os.sep in ext or len(ext) < 2:
        raise ValueError(f"--caption-extension must be a file extension like .txt, got {args.caption_extension!r}")
    if args.output_dir is not None:
        check_output_dir(args.output_dir)
    if args.format == "parquet":
        _require("pyarrow", "pip install pyarrow (or 'mm-captioner[ray]')")
    job = BulkJob(args.output_dir, "txt" if args.write_txt else args.format, args.task, options, args.batch_size,
                  args.workers, not args.full_decode, args.prefix, args.suffix, args.overwrite, ext)
    return (job, *plan(args.inputs, job, k, i))


def _require(module: str, how: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(f"this needs {module}, which is not installed: {how}")


def load_source(source):
    """A PIL image from a path or a shard sample; ImageError / BadSample (ValueErrors) say why not."""
    from mm.samples import sample_image
    from vision.preprocess import load_image

    if isinstance(source, Exception):
        raise source
    return sample_image(source) if isinstance(source, dict) else load_image(source)


def run(args) -> int:
    from mm.captioner import Captioner

    try:
        options = check_args(args)  # bad options, a bad checkpoint and an unknown task fail before any work
        if args.out is not None:
            from mm.checkpoint import check_output_file

            check_output_file(args.out, "--out")
        bulk = check_bulk(args, options)
        on_ray = bulk is not None and args.ray is not None
        if on_ray:  # the actors load the model; the driver checks what it can without it
            from mm.ray_caption import check_ray

            check_ray(args)
        else:
            cap = Captioner.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype,
                                            batch_size=args.batch_size, compile=args.compile)
            cap.model.cfg.prompt(args.task)
    except ValueError as e:  # bad options, CheckpointError, ConfigError
        print(f"mm caption: {e}", file=sys.stderr)
        return 2
    if on_ray:
        return run_ray(args, *bulk)
    if bulk is not None:
        return run_bulk(cap, *bulk)
    # Bytes, not text: a line holding an undecodable file name is written as JSON escapes (json_line).
    out = open(args.out, "wb") if args.out else sys.stdout.buffer
    try:
        done, failed = caption_all(cap, args, options, out)
    except BrokenPipeError:  # the reader of stdout went away: stop quietly, as `yes | head -1` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    finally:
        if args.out:
            out.close()
    print(f"mm caption: {done} captioned, {failed} failed", file=sys.stderr)
    return min(failed, 255)


def run_bulk(cap, job, units, already: int) -> int:
    from mm.bulk_caption import caption_units, exit_status

    return exit_status(caption_units(cap, units, job), already)


def run_ray(args, job, units, already: int) -> int:
    from mm.bulk_caption import exit_status
    from mm.ray_caption import caption_on_ray

    return exit_status(caption_on_ray(args, job, units), already)


def caption_all(cap, args, options: dict, out) -> tuple[int, int]:
    """Caption every input in batches, writing a line per image; returns (captioned, failed)."""
    from mm.bulk_caption import caption_records

    failed = done = 0
    pending: list[tuple[dict, object]] = []
    bar = tqdm(desc="caption", unit="img", file=sys.stderr, dynamic_ncols=True)

    def flush():
        nonlocal done
        if not pending:
            return
        out.write(b"".join(json_line(line) for line in caption_records(cap, pending, args.task, options)))
        out.flush()
        done += len(pending)
        bar.update(len(pending))
        pending.clear()

    try:
        for rec, source in items(args.inputs):
            name = rec.get("path") or "#".join(filter(None, (rec.get("url"), rec.get("key"))))
            try:
                image = load_source(source)
            except (OSError, ValueError) as e:  # ImageError and BadSample are ValueErrors
                failed += 1
                tqdm.write(f"mm caption: skipped {name}: {e}", file=sys.stderr)
                continue
            pending.append((rec, image))
            if len(pending) >= args.batch_size:
                flush()
        flush()
    finally:
        bar.close()
    return done, failed
