"""An endless, resumable stream of training batches over webdataset shards.

The position is (epoch, batch index within the epoch). Each epoch's order depends
only on (seed, epoch, rank), so a resumed run rebuilds the epoch's loader and skips
the batches it had already used: the batches that follow are the ones an
uninterrupted run would have seen.

Skipped samples are counted over the whole run: the position carries the counts of the
epochs before the current one (so they survive a resume), and the current epoch's are
the loader's own, which also takes the records that arrive after an epoch's last batch.
"""

from __future__ import annotations

from collections import Counter
from functools import partial

from mm.samples import DataErrors, good_samples, sample_texts
from train.config import TrainConfig
from train.data.augment import Augment
from train.data.reader import dataset_size, make_loader


def read_texts(urls: str, tasks: list[str], limit: int, errors: DataErrors | None = None,
               allow_pipe: bool = False) -> list[str]:
    """Up to `limit` texts (every task a sample has, in task order) for the tokenizer, by the readers'
    text and shard rules (images are not decoded); what is skipped is counted in `errors`."""
    texts: list[str] = []
    parse = partial(sample_texts, tasks=tasks)
    for found in good_samples(urls, DataErrors() if errors is None else errors, parse, allow_pipe):
        texts += found.values()
        if len(texts) >= limit:
            return texts[:limit]
    return texts


class DataStream:
    def __init__(self, cfg: TrainConfig, urls: str, tokenizer, num_image_tokens: int, transform, info,
                 position: dict | None = None, resampled: bool | None = None,
                 num_workers: int | None = None, augment: bool = False):
        if not urls:
            raise ValueError("no training shards given: set data.train (e.g. 'data/train-{000000..000009}.tar')")
        self.cfg, self.urls, self.info, self.transform = cfg, urls, info, transform
        self.augment = Augment(cfg.augment) if augment and cfg.augment.enabled else None  # training data only
        self.resampled = cfg.data.resampled if resampled is None else resampled
        self.num_workers = cfg.data.num_workers if num_workers is None else num_workers
        prompts = cfg.model.tasks
        max_len = num_image_tokens + cfg.model.max_text_len

        def encode(task: str, text: str):
            return tokenizer.build_example(prompts[task], text, num_image_tokens, max_len)

        self.encode, self.pad_id = encode, tokenizer.pad_id
        self.pad_to = {t: num_image_tokens + n for t, n in cfg.data.pad_to.items()} or None
        self.epoch_batches = cfg.data.epoch_batches or self._batches_from_sizes()
        pos = position or {"epoch": 0, "batch": 0}
        self.epoch, self.batch = pos["epoch"], 0
        self._earlier = Counter(pos.get("skipped_earlier", {}))  # skips of the epochs before this one
        self._examples: list[dict] = []
        self.loader = None
        self._start_epoch(skip=pos["batch"])

    def _batches_from_sizes(self) -> int:
        n = dataset_size(self.urls)
        per_step = self.cfg.optim.batch_size * self.info.world_size
        return max(1, n // per_step) if n else 1000

    def _start_epoch(self, skip: int = 0):
        if self.loader is not None:  # the epoch that ends: its skips join the earlier ones
            self._earlier.update(self.loader.errors.counts)
            self._examples += self.loader.errors.examples[: 100 - len(self._examples)]
        d = self.cfg.data
        self.loader = make_loader(
            self.urls, encode=self.encode, image_transform=self.transform, batch_size=self.cfg.optim.batch_size,
            tasks=d.tasks, task_mode=d.task_mode, resampled=self.resampled, seed=self.cfg.seed, epoch=self.epoch,
            num_workers=self.num_workers, rank=self.info.rank, world_size=self.info.world_size,
            shuffle=d.shuffle, pad_id=self.pad_id, pad_to=self.pad_to,
            samples_per_epoch=(d.epoch_batches * self.cfg.optim.batch_size * self.info.world_size) or None,
            augment=self.augment, allow_pipe=d.allow_pipe,
        )
        self.iterator = iter(self.loader)
        self.batch = 0
        for _ in range(skip):
            if self._pull() is None:
                break

    def _pull(self):
        try:
            batch = next(self.iterator)
        except StopIteration:
            return None
        self.batch += 1
        return batch

    def next(self, stop_at_epoch_end: bool = False):
        """The next batch; a new epoch starts when this one ends (or after epoch_batches)."""
        while True:
            if not (self.resampled and self.batch >= self.epoch_batches):
                batch = self._pull()
                if batch is not None:
                    return batch
            if stop_at_epoch_end:
                return None
            self.epoch += 1
            self._start_epoch()

    def position(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "skipped_earlier": dict(self._earlier)}

    def data_errors(self) -> DataErrors:
        """Everything skipped so far in the run (examples only from this process's epochs)."""
        seen = DataErrors()
        seen.merge({"counts": dict(self._earlier), "examples": self._examples})
        seen.merge({"counts": dict(self.loader.errors.counts), "examples": self.loader.errors.examples})
        return seen
