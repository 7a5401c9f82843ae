"""The training reader: webdataset shards -> padded, tokenised batches, as a declarative pipeline.

The stages follow open_clip: shard list (or resampled shards) -> shard shuffle
seeded by (seed, epoch) -> split by node -> split by worker -> tar samples ->
sample shuffle -> decode (RGB, with the captioner's pixel cap) + texts -> batch by task ->
collate -> WebLoader. Three things a reader must know:

- Broken data never stops training. It is skipped and counted by reason with its
  shard URL and key, by the rules every reader shares (`mm/samples.py`: `bad_shard`,
  `bad_json`, `bad_text`, `missing_text`, `missing_image`, `bad_image`), plus `missing_task`
  (lacks the batch's task) and `too_long` (encoding longer than its `pad_to`). Counting
  happens wherever the stage runs (a worker process), so each
  batch carries the records made since the previous one under `data_errors`; the
  loader moves them into `loader.errors` and drops the key. A stream that ends in
  errors emits a record-only item, so no count is lost.
- Every random choice is seeded from (seed, epoch, ...) at iteration time and the
  epoch comes from `set_epoch`, not from an iteration counter: workers are fresh
  copies of the pipeline each epoch, so a counter inside them would never advance.
  The batch's task is drawn from (seed, epoch, step), step = the batch's index on
  its rank, so when samples carry every task all ranks train the same task (and
  padded length) at a step.
- Without resampling, each rank and worker reads a disjoint slice of the shards,
  so there must be at least ranks x workers shards; we check that up front
  rather than let a worker with nothing to read stall a rank.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import islice

import torch
import webdataset as wds
from torch.utils.data import get_worker_info

from lm.loss import IGNORE_INDEX
from mm.samples import TASKS, BadSample, DataErrors, expand_urls, sample_image, sample_texts, shard_samples

__all__ = ["DataErrors", "Loader", "check_shards", "dataset_size", "expand_urls", "make_loader"]

Encode = Callable[[str, str], tuple[list[int], list[int]]]


class _Epoch:
    """The epoch, shared by all stages of one pipeline and copied into workers when they start."""

    def __init__(self, value: int):
        self.value = value


def _rng(*parts) -> random.Random:
    return random.Random("/".join(map(str, parts)))  # str seeds hash with sha512: stable across processes


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def dataset_size(urls: str | list[str]) -> int | None:
    """Samples in the shards according to the `sizes.json` beside them; None if any shard is not listed."""
    total, tables = 0, {}
    for url in expand_urls(urls):
        path = url.removeprefix("file:")
        if "://" in path or path.startswith("pipe:"):
            return None
        folder, name = os.path.split(path)
        if folder not in tables:
            sizes = os.path.join(folder, "sizes.json")
            tables[folder] = {}
            if os.path.exists(sizes):
                with open(sizes, encoding="utf-8") as f:
                    tables[folder] = json.load(f)
        if name not in tables[folder]:
            return None
        total += int(tables[folder][name])
    return total


# ---------------------------------------------------------------- pipeline stages (picklable callables)

class _ShuffleShards:
    def __init__(self, seed: int, epoch: _Epoch):
        self.seed, self.epoch = seed, epoch

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        shards = list(src)
        _rng(self.seed, self.epoch.value, "shards").shuffle(shards)  # identical on every rank
        return iter(shards)


class _SplitByNode:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src):
        return islice(src, self.rank, None, self.world_size)


def _split_by_worker(src):
    worker, num_workers = _worker()
    return islice(src, worker, None, num_workers)


class _ResampleShards:
    """Shards drawn with replacement, a different stream per (rank, worker), forever."""

    def __init__(self, seed: int, epoch: _Epoch, rank: int):
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, src):
        shards = list(src)
        rng = _rng(self.seed, self.epoch.value, self.rank, _worker()[0], "resample")
        while True:
            yield dict(rng.choice(shards))


class _TarSamples:
    """wds's tarfile_to_samples, grouping per shard: a broken shard is counted once, and its last,
    partial sample cannot merge with the next shard's first one."""

    def __init__(self, errors: DataErrors):
        self.errors = errors

    def __call__(self, src):
        for shard in src:
            yield from shard_samples(shard["url"], self.errors)


class _ShuffleSamples:
    def __init__(self, bufsize: int, seed: int, epoch: _Epoch, rank: int):
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank

    def __call__(self, src):
        rng = _rng(self.seed, self.epoch.value, self.rank, _worker()[0], "samples")
        return wds.shuffle(self.bufsize, self.bufsize, rng=rng)(src)


class _Decode:
    """Raw sample -> {"image": tensor, "texts": {task: str}, "key", "url"}; texts from json, then txt.
    `augment(pil, rng)` changes the image first, with a generator seeded per (seed, epoch, rank, worker)."""

    def __init__(self, image_transform: Callable, tasks: tuple[str, ...], errors: DataErrors,
                 augment: Callable | None = None, seed: int = 0, epoch: _Epoch | None = None, rank: int = 0):
        self.image_transform, self.tasks, self.errors = image_transform, tasks, errors
        self.augment, self.seed, self.epoch, self.rank = augment, seed, epoch, rank

    def __call__(self, src):
        epoch = self.epoch.value if self.epoch is not None else 0
        rng = _rng(self.seed, epoch, self.rank, _worker()[0], "augment")
        for s in src:
            url, key = s.get("__url__", "?"), s.get("__key__", "?")
            try:
                texts = sample_texts(s, self.tasks)
                pil = sample_image(s)
            except BadSample as e:
                self.errors.add(e.reason, url, key, e.detail)
                continue
            if self.augment is not None:
                pil = self.augment(pil, rng)
            yield {"image": self.image_transform(pil), "texts": texts, "key": key, "url": url}


class _Batch:
    """Examples -> collated batches. task_mode "batch": the task is drawn per batch among those every
    sample in it has (samples lacking it are skipped); "all": one example per (sample, task)."""

    def __init__(self, *, batch_size: int, tasks: tuple[str, ...], task_mode: str, encode: Encode,
                 pad_to: dict | int | None, pad_id: int, drop_last: bool, seed: int, epoch: _Epoch,
                 errors: DataErrors, max_batches: int | None):
        self.batch_size, self.tasks, self.task_mode, self.encode = batch_size, tasks, task_mode, encode
        self.pad_to, self.pad_id, self.drop_last, self.seed, self.epoch = pad_to, pad_id, drop_last, seed, epoch
        self.errors, self.max_batches = errors, max_batches

    def _limit(self, task: str) -> int | None:
        return self.pad_to[task] if isinstance(self.pad_to, dict) else self.pad_to

    def _encode(self, ex: dict, task: str) -> dict | None:
        ids, labels = self.encode(task, ex["texts"][task])
        if len(ids) != len(labels):
            raise ValueError(f"encode({task!r}, text) gave {len(ids)} input_ids but {len(labels)} labels; they must align")
        limit = self._limit(task)
        if limit is not None and len(ids) > limit:
            self.errors.add("too_long", ex["url"], ex["key"], f"{task}: {len(ids)} tokens > pad_to {limit}")
            return None
        return {**ex, "task": task, "input_ids": ids, "labels": labels}

    def _choose(self, buf: list[dict], step: int) -> str:
        have = [e["texts"].keys() for e in buf]
        common = [t for t in self.tasks if all(t in h for h in have)]
        if not common:  # sources with different task sets: take a task most samples have
            n = Counter(t for h in have for t in h)
            common = [t for t in self.tasks if n[t] == max(n.values())]
        return _rng(self.seed, self.epoch.value, step, "task").choice(common)

    def _encode_for(self, buf: list[dict], task: str) -> list[dict]:
        items = []
        for e in buf:
            if task not in e["texts"]:
                self.errors.add("missing_task", e["url"], e["key"], f"batch task {task!r}, sample has {sorted(e['texts'])}")
            elif (item := self._encode(e, task)) is not None:
                items.append(item)
        return items

    def _collate(self, items: list[dict], task: str | list[str]) -> dict:
        lengths = [len(it["input_ids"]) for it in items]
        T = max(lengths) if self.pad_to is None else max(self._limit(it["task"]) for it in items)
        input_ids = torch.full((len(items), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), T), dtype=torch.long)
        for i, (it, n) in enumerate(zip(items, lengths)):
            input_ids[i, :n] = torch.tensor(it["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(it["labels"], dtype=torch.long)
            attention_mask[i, :n] = 1
        if len({tuple(it["image"].shape) for it in items}) > 1:
            shapes = {it["key"]: tuple(it["image"].shape) for it in items}
            raise ValueError(f"image_transform gave different shapes in one batch {shapes}; it must resize to one size")
        batch = {"images": torch.stack([it["image"] for it in items]), "input_ids": input_ids, "labels": labels,
                 "attention_mask": attention_mask, "task": task,
                 "keys": [it["key"] for it in items], "urls": [it["url"] for it in items]}
        if (record := self.errors.drain()) is not None:
            batch["data_errors"] = record
        return batch

    def _batches(self, src) -> Iterator[dict]:
        worker, num_workers = _worker()
        B, buf, made = self.batch_size, [], 0
        for ex in src:
            if self.task_mode == "all":
                buf += [it for t in self.tasks if t in ex["texts"] and (it := self._encode(ex, t)) is not None]
                while len(buf) >= B:
                    yield self._collate(buf[:B], [it["task"] for it in buf[:B]])
                    buf, made = buf[B:], made + 1
                continue
            buf.append(ex)
            if len(buf) == B:
                task = self._choose(buf, made * num_workers + worker)  # = this batch's step on its rank
                buf = self._encode_for(buf, task)
                if len(buf) == B:
                    yield self._collate(buf, task)
                    buf, made = [], made + 1
        if buf and not self.drop_last:
            if self.task_mode == "all":
                yield self._collate(buf, [it["task"] for it in buf])
            elif items := self._encode_for(buf, task := self._choose(buf, made * num_workers + worker)):
                yield self._collate(items, task)

    def __call__(self, src):
        yield from islice(self._batches(src), self.max_batches)
        if (record := self.errors.drain()) is not None:
            yield {"data_errors": record}


# ---------------------------------------------------------------- the loader

class Loader:
    """Batches over one epoch per `iter()`; `errors` gathers what every worker skipped."""

    def __init__(self, pipeline: wds.DataPipeline, epoch: _Epoch, *, num_workers: int, seed: int, rank: int,
                 num_samples: int | None, num_batches: int | None):
        self.pipeline, self._epoch, self.seed, self.rank = pipeline, epoch, seed, rank
        self.errors = DataErrors()
        self.num_samples = num_samples  # from sizes.json, None when unknown
        self.num_batches = num_batches  # per rank per epoch: exact when resampled, an estimate otherwise
        # batch_size=None: the pipeline batches; a fresh set of workers per epoch picks up set_epoch.
        self.dataloader = wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=False)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __iter__(self) -> Iterator[dict]:
        # Workers seed torch and random from this, so random image transforms repeat with the run.
        self.dataloader.generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank)) & (2**62 - 1))
        batches = iter(self.dataloader)
        while True:
            # Opening an epoch draws from the global torch RNG; kept out of it, the model's own
            # draws (dropout) do not depend on when the stream was opened, so a resume is exact.
            with torch.random.fork_rng(devices=[]):
                item = next(batches, None)
            if item is None:
                return
            record = item.pop("data_errors", None)
            if record is not None:
                self.errors.merge(record)
            if "images" in item:
                yield item


def check_shards(shards: list[str]) -> None:
    """Fail early when no shard could ever be read: an empty list, or local paths none of which exists."""
    if not shards:
        raise ValueError("no shards given")
    local = [u.removeprefix("file:") for u in shards if "://" not in u and not u.startswith("pipe:")]
    if local and len(local) == len(shards) and not any(os.path.exists(u) for u in local):
        raise FileNotFoundError(f"none of the {len(shards)} shards exists (first: {shards[0]!r}); check the path or pattern")


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank, world_size = (r if rank is None else rank), (w if world_size is None else world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


def make_loader(urls: str | list[str], *, encode: Encode, image_transform: Callable, batch_size: int,
                tasks: list[str] | tuple[str, ...] | None = None, task_mode: str = "batch", resampled: bool = False,
                seed: int = 0, epoch: int = 0, num_workers: int = 0, rank: int | None = None,
                world_size: int | None = None, drop_last: bool = True, shuffle: int = 1000,
                pad_to: dict[str, int] | int | None = None, pad_id: int = 0,
                samples_per_epoch: int | None = None, augment: Callable | None = None) -> Loader:
    """Build the reader. `shuffle` is the sample buffer size (<= 1 reads in order: no shard or sample
    shuffle). With `resampled`, an epoch is `samples_per_epoch` (default: sizes.json) samples over all
    ranks; unknown, the stream never ends. `pad_to` fixes T per task (dict) or for all (int).
    `augment(pil, rng)` (train/data/augment.py) changes each image before `image_transform`."""
    shards = expand_urls(urls)
    rank, world_size = _rank_world(rank, world_size)
    tasks = tuple(tasks) if tasks else TASKS
    check_shards(shards)
    if task_mode not in ("batch", "all"):
        raise ValueError(f"task_mode must be 'batch' or 'all', got {task_mode!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(pad_to, dict) and (missing := [t for t in tasks if t not in pad_to]):
        raise ValueError(f"pad_to has no length for tasks {missing}; it covers {sorted(pad_to)}")
    readers = world_size * max(1, num_workers)
    if not resampled and len(shards) < readers:
        raise ValueError(f"{len(shards)} shards cannot feed {world_size} ranks x {max(1, num_workers)} workers "
                         f"= {readers} readers (each needs its own shard); use resampled=True or fewer workers")

    epoch_state, errors = _Epoch(epoch), DataErrors()
    num_samples = dataset_size(shards)
    if resampled:
        per_epoch = samples_per_epoch or num_samples
        max_batches = None if per_epoch is None else math.ceil(per_epoch / (batch_size * readers))
        source = [_ResampleShards(seed, epoch_state, rank)]
        num_batches = None if max_batches is None else max_batches * max(1, num_workers)
    else:
        max_batches = None
        source = [_ShuffleShards(seed, epoch_state) if shuffle > 1 else None, _SplitByNode(rank, world_size), _split_by_worker]
        num_batches = None if num_samples is None else num_samples // (batch_size * world_size)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        *source,
        _TarSamples(errors),
        _ShuffleSamples(shuffle, seed, epoch_state, rank) if shuffle > 1 else None,
        _Decode(image_transform, tasks, errors, augment, seed, epoch_state, rank),
        _Batch(batch_size=batch_size, tasks=tasks, task_mode=task_mode, encode=encode, pad_to=pad_to, pad_id=pad_id,
               drop_last=drop_last, seed=seed, epoch=epoch_state, errors=errors, max_batches=max_batches),
    )
    return Loader(pipeline, epoch_state, num_workers=num_workers, seed=seed, rank=rank,
                  num_samples=num_samples, num_batches=num_batches)
