"""Captioning a dataset: shards (or folders) in, one complete output per unit out.

`plan` turns the inputs into units, one per shard (and one per folder of loose images),
each named after its source, and drops the units whose output is already complete, so a
rerun resumes (`--overwrite` redoes them); `--num-shards K --shard-index I` keeps every
K-th unit from the I-th, for launchers that start one process per GPU or node. All of this
runs before the model loads, so a bad input is exit 2 and no work.

`caption_units` streams the units through the decode pool (mm/decode_pool.py) and the
model in batches of `batch_size` and hands the captions to each unit's output
(mm/shard_outputs.py). A unit is committed once all its images are through; a skipped
image is counted by reason (the rules of mm/samples.py) in the unit's summary; a unit
that cannot be read to its end (`bad_shard`) or whose output cannot be written fails
alone: it is reported, its partial output removed, and the next run retries it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mm.confidence import reported
from mm.decode_pool import Skipped, decoded
from mm.samples import DataErrors, expand_urls
from mm.shard_outputs import FORMATS, atomic_write, json_line, open_output, output_name, txt_path


@dataclass(frozen=True)
class Unit:
    name: str  # what its outputs are named after
    source: str  # a shard URL, or a folder
    paths: tuple[str, ...] = ()  # a folder's images still to caption
    already: int = 0  # a folder's images that already have their caption file (--write-txt)

    def items(self) -> Iterator[tuple[dict, object]]:
        from mm.caption_cli import shard_items

        if self.paths or self.already:
            yield from (({"path": p}, p) for p in self.paths)
        else:
            yield from shard_items(self.source)


@dataclass(frozen=True)
class BulkJob:
    """What every process of a job needs to know (picklable: Ray actors get a copy)."""

    output_dir: str | None  # None with --write-txt
    fmt: str  # jsonl | parquet | wds | txt
    task: str
    options: dict = field(default_factory=dict)  # generation options
    batch_size: int = 16
    workers: int = 0
    draft: bool = True
    prefix: str = ""
    suffix: str = ""
    overwrite: bool = False
    txt_extension: str = ".txt"


def plan(inputs: list[str], job: BulkJob, num_shards: int = 1, shard_index: int = 0) -> tuple[list[Unit], int]:
    """(units still to do, number already complete); ValueError names a bad input."""
    from mm.caption_cli import expand

    shards, folders = [], {}
    for kind, spec in expand(inputs):
        if kind == "missing":
            raise ValueError(f"{spec}: the pattern matches no file")
        if kind in ("shard", "shards"):
            shards += expand_urls(spec)
        elif not Path(spec).is_file():
            raise ValueError(f"{spec}: no such file or directory")
        else:
            folders.setdefault(str(Path(spec).parent), []).append(spec)
    if job.fmt == "txt" and shards:
        raise ValueError(f"--write-txt writes a caption file beside each image; {shards[0]} is a shard: "
                         "use --output-dir for shards")
    if job.fmt == "wds" and folders:
        raise ValueError(f"--format wds copies shards; {next(iter(folders))} holds loose images: use jsonl or parquet")
    units = [Unit(output_name(u), u) for u in shards] + [_folder(f, ps, job) for f, ps in folders.items()]
    _check_names(units, job)
    units = units[shard_index::num_shards]
    if job.fmt == "txt" or job.overwrite:
        return units, 0
    todo = [u for u in units if not (Path(job.output_dir) / (u.name + FORMATS[job.fmt])).exists()]
    return todo, len(units) - len(todo)


def _folder(folder: str, paths: list[str], job: BulkJob) -> Unit:
    if job.fmt != "txt":
        return Unit(output_name(folder), folder, tuple(paths))
    todo = tuple(p for p in paths if job.overwrite or not txt_path(p, job.txt_extension).exists())
    return Unit(folder, folder, todo, len(paths) - len(todo))


def _check_names(units: list[Unit], job: BulkJob) -> None:
    if job.fmt == "txt":
        return
    seen: dict[str, str] = {}
    for u in units:
        if u.name in seen:
            raise ValueError(f"{seen[u.name]} and {u.source} would both write {u.name}{FORMATS[job.fmt]} in "
                             f"{job.output_dir}; caption them into different --output-dir")
        seen[u.name] = u.source
        if job.fmt == "wds" and Path(u.source).resolve() == (Path(job.output_dir) / (u.name + ".tar")).resolve():
            raise ValueError(f"--format wds would overwrite its input {u.source}; choose another --output-dir")


class UnitRun:
    """One unit in progress: its output, its skip counts, and the first error that fails it."""

    def __init__(self, unit: Unit, job: BulkJob):
        self.unit, self.job = unit, job
        self.errors, self.captioned, self.error = DataErrors(max_examples=20), 0, None
        self.t0 = time.perf_counter()
        self.out = self._guard(open_output, job.fmt, job.output_dir, unit.name, unit.source, job.task,
                               job.txt_extension)

    def _guard(self, fn, *args):
        if self.error is None:
            try:
                return fn(*args)
            except Exception as e:  # a full disk, a permission, a shard gone between reads: this unit only
                self.error = f"{type(e).__name__}: {e}"
        return None

    def skip(self, rec: dict, why: Skipped) -> None:
        self.errors.add(why.reason, self.unit.source, rec.get("key") or rec.get("path") or "", why.detail)

    def add(self, rows: list[dict]) -> None:
        self.captioned += len(rows)
        self._guard(lambda: self.out.add(rows))

    def finish(self) -> dict:
        failed = self.error is not None or self.errors.counts["bad_shard"] > 0
        summary = {"name": self.unit.name, "source": self.unit.source, "status": "failed" if failed else "done",
                   "captioned": self.captioned, "skipped": dict(self.errors.counts),
                   "examples": self.errors.examples, "error": self.error,
                   "seconds": round(time.perf_counter() - self.t0, 3)}
        if self.unit.already:
            summary["already_captioned"] = self.unit.already
        if self.out is not None:
            try:
                (self.out.abort if failed else self.out.commit)(summary)
            except Exception as e:  # could not commit: the unit is not done; a rerun redoes it
                self.error = self.error or f"{type(e).__name__}: {e}"
        elif self.job.output_dir is not None:  # the output never opened: the summary still says why
            with contextlib.suppress(OSError):  # the failure is also reported on stderr
                atomic_write(Path(self.job.output_dir) / (self.unit.name + ".summary.json"), json_line(summary))
        if self.error is not None and summary["error"] is None:
            summary.update(status="failed", error=self.error)
        return summary


def _jobs(units: list[Unit], chunk: int) -> Iterator[tuple[int, list | None]]:
    """(unit index, up to `chunk` items) for every unit's items, then (unit index, None) at its end."""
    for i, unit in enumerate(units):
        items: list = []
        for item in unit.items():
            items.append(item)
            if len(items) == chunk:
                yield i, items
                items = []
        if items:
            yield i, items
        yield i, None


def caption_units(cap, units: list[Unit], job: BulkJob, report=None) -> list[dict]:
    """Caption every unit, committing each output when its unit ends; -> the units' summaries."""
    report = report or (lambda s: tqdm.write(unit_line(s), file=sys.stderr))
    draft = 2 * cap.transform.image_size if job.draft else None
    runs: dict[int, UnitRun] = {}
    pending: list[tuple[dict, object]] = []
    summaries = []
    bar = tqdm(desc="caption", unit="img", file=sys.stderr, dynamic_ncols=True)
    try:
        for i, items in decoded(_jobs(units, max(1, job.batch_size // 2)), cap.transform, draft, job.workers):
            run = runs.get(i) or runs.setdefault(i, UnitRun(units[i], job))
            if items is None:  # the unit's last image is in `pending`: caption it, then commit
                bar.update(_caption(cap, run, pending, job))
                summaries.append(runs.pop(i).finish())
                report(summaries[-1])
                continue
            for rec, pixels in items:
                if run.error is not None:  # this unit has failed: its images are not worth the model's time
                    break
                if isinstance(pixels, Skipped):
                    run.skip(rec, pixels)
                else:
                    pending.append((rec, cap.transform.to_tensor(pixels)))
            if len(pending) >= job.batch_size:
                bar.update(_caption(cap, run, pending, job))
    except BaseException as e:  # the model failed, or the job was stopped: no unit in flight is complete
        for run in runs.values():
            run.error = run.error or f"{type(e).__name__}: {e}"
            run.finish()
        raise
    finally:
        bar.close()
    return summaries


def caption_records(cap, pending: list[tuple[dict, object]], task: str, options: dict,
                    prefix: str = "", suffix: str = "") -> list[dict]:
    """Caption a batch of (record, image) pairs: each record with its caption, task and confidence,
    as every output of `mm caption` writes them."""
    res = cap.run([image for _, image in pending], task=task, **options)
    return [rec | {"caption": prefix + text + suffix, "task": task} | reported(conf, odd)
            for (rec, _), text, conf, odd in zip(pending, res.texts, res.confidence, res.unfamiliar)]


def _caption(cap, run: UnitRun, pending: list, job: BulkJob) -> int:
    if not pending:
        return 0
    run.add(caption_records(cap, pending, job.task, job.options, job.prefix, job.suffix))
    n = len(pending)
    pending.clear()
    return n


def unit_line(s: dict) -> str:
    skipped = ", ".join(f"{r} {n}" for r, n in s["skipped"].items()) or "none"
    tail = f"; FAILED: {s['error'] or 'the shard broke, see its summary'}" if s["status"] == "failed" else ""
    return f"mm caption: {s['source']}: {s['captioned']} captioned, skipped {skipped}{tail}"


def exit_status(summaries: list[dict], already: int) -> int:
    """Prints the job's total; -> the number of failed units and skipped images (capped at 255)."""
    failed = sum(s["status"] == "failed" for s in summaries)
    skipped = sum(n for s in summaries for r, n in s["skipped"].items() if r != "bad_shard")
    captioned = sum(s["captioned"] for s in summaries)
    print(f"mm caption: {len(summaries) - failed} units done, {failed} failed, {already} already complete; "
          f"{captioned} captioned, {skipped} skipped", file=sys.stderr)
    return min(failed + skipped, 255)
