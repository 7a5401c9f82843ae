"""The stages of the training reader (train/data/reader.py), as picklable callables: webdataset
copies them into every worker process. Each random choice is seeded from (seed, epoch, ...)
when it is made, and the epoch is the shared `Epoch` that `Loader.set_epoch` moves (a counter
inside a worker would restart with every fresh worker)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import islice

import torch
import webdataset as wds
from torch.utils.data import get_worker_info

from lm.loss import IGNORE_INDEX
from mm.samples import BadSample, DataErrors, sample_image, sample_texts, shard_samples

Encode = Callable[[str, str], tuple[list[int], list[int]]]


class Epoch:
    """The epoch, shared by all stages of one pipeline and copied into workers when they start."""

    def __init__(self, value: int):
        self.value = value


def _rng(*parts) -> random.Random:
    return random.Random("/".join(map(str, parts)))  # str seeds hash with sha512: stable across processes


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)



class ShuffleShards:
    def __init__(self, seed: int, epoch: Epoch):
        self.seed, self.epoch = seed, epoch

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        shards = list(src)
        _rng(self.seed, self.epoch.value, "shards").shuffle(shards)  # identical on every rank
        return iter(shards)


class SplitByNode:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src):
        return islice(src, self.rank, None, self.world_size)


def split_by_worker(src):
    worker, num_workers = _worker()
    return islice(src, worker, None, num_workers)


class ResampleShards:
    """Shards drawn with replacement, a different stream per (rank, worker), forever."""

    def __init__(self, seed: int, epoch: Epoch, rank: int):
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, src):
        shards = list(src)
        rng = _rng(self.seed, self.epoch.value, self.rank, _worker()[0], "resample")
        while True:
            yield dict(rng.choice(shards))


class TarSamples:
    """wds's tarfile_to_samples, grouping per shard: a broken shard is counted once, and its last,
    partial sample cannot merge with the next shard's first one."""

    def __init__(self, errors: DataErrors, allow_pipe: bool = False):
        self.errors, self.allow_pipe = errors, allow_pipe

    def __call__(self, src):
        for shard in src:
            yield from shard_samples(shard["url"], self.errors, self.allow_pipe)


class ShuffleSamples:
    def __init__(self, bufsize: int, seed: int, epoch: Epoch, rank: int):
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank

    def __call__(self, src):
        rng = _rng(self.seed, self.epoch.value, self.rank, _worker()[0], "samples")
        return wds.shuffle(self.bufsize, self.bufsize, rng=rng)(src)


class Decode:
    """Raw sample -> {"image": tensor, "texts": {task: str}, "key", "url"}; texts from json, then txt.
    `augment(pil, rng)` changes the image first, with a generator seeded per (seed, epoch, rank, worker)."""

    def __init__(self, image_transform: Callable, tasks: tuple[str, ...], errors: DataErrors,
                 augment: Callable | None = None, seed: int = 0, epoch: Epoch | None = None, rank: int = 0):
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


class Batch:
    """Examples -> collated batches. task_mode "batch": the task is drawn per batch among those every
    sample in it has (samples lacking it are skipped); "all": one example per (sample, task)."""

    def __init__(self, *, batch_size: int, tasks: tuple[str, ...], task_mode: str, encode: Encode,
                 pad_to: dict | int | None, pad_id: int, drop_last: bool, seed: int, epoch: Epoch,
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
