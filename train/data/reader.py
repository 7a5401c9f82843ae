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
from collections.abc import Callable, Iterator

import torch
import webdataset as wds

from mm.samples import TASKS, DataErrors, expand_urls
from train.data.stages import (
    Batch,
    Decode,
    Encode,
    Epoch,
    ResampleShards,
    ShuffleSamples,
    ShuffleShards,
    SplitByNode,
    TarSamples,
    split_by_worker,
)

__all__ = ["DataErrors", "Loader", "check_shards", "dataset_size", "expand_urls", "make_loader"]


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




# ---------------------------------------------------------------- the loader

class Loader:
    """Batches over one epoch per `iter()`; `errors` gathers what every worker skipped."""

    def __init__(self, pipeline: wds.DataPipeline, epoch: Epoch, *, num_workers: int, seed: int, rank: int,
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
                samples_per_epoch: int | None = None, augment: Callable | None = None,
                allow_pipe: bool = False) -> Loader:
    """Build the reader. `shuffle` is the sample buffer size (<= 1 reads in order: no shard or sample
    shuffle). With `resampled`, an epoch is `samples_per_epoch` (default: sizes.json) samples over all
    ranks; unknown, the stream never ends. `pad_to` fixes T per task (dict) or for all (int).
    `augment(pil, rng)` (train/data/augment.py) changes each image before `image_transform`.
    `allow_pipe` lets `pipe:CMD` shard URLs run CMD in a shell (mm/samples.py: refused otherwise)."""
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

    epoch_state, errors = Epoch(epoch), DataErrors()
    num_samples = dataset_size(shards)
    if resampled:
        per_epoch = samples_per_epoch or num_samples
        max_batches = None if per_epoch is None else math.ceil(per_epoch / (batch_size * readers))
        source = [ResampleShards(seed, epoch_state, rank)]
        num_batches = None if max_batches is None else max_batches * max(1, num_workers)
    else:
        max_batches = None
        source = [ShuffleShards(seed, epoch_state) if shuffle > 1 else None, SplitByNode(rank, world_size), split_by_worker]
        num_batches = None if num_samples is None else num_samples // (batch_size * world_size)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        *source,
        TarSamples(errors, allow_pipe),
        ShuffleSamples(shuffle, seed, epoch_state, rank) if shuffle > 1 else None,
        Decode(image_transform, tasks, errors, augment, seed, epoch_state, rank),
        Batch(batch_size=batch_size, tasks=tasks, task_mode=task_mode, encode=encode, pad_to=pad_to, pad_id=pad_id,
               drop_last=drop_last, seed=seed, epoch=epoch_state, errors=errors, max_batches=max_batches),
    )
    return Loader(pipeline, epoch_state, num_workers=num_workers, seed=seed, rank=rank,
                  num_samples=num_samples, num_batches=num_batches)
