"""Image decoding and preprocessing for bulk captioning, in worker processes, streamed.

JPEG decoding and the resize/pad cost more CPU than the model itself (NOTES.md), so
`decoded` runs them in `workers` processes while the model captions the previous batch.
Jobs go out in chunks and come back in order; at most `2 * workers + 2` chunks are in
flight, so memory stays flat however many images a job has (the pool's own `imap` would
read its whole input ahead). A worker returns the `ImageTransform.fit` pixels, a small
uint8 array, and the main process does the last float step (`to_tensor`), so the tensor
the model sees is exactly `Captioner.transform(load_image(...))`. With `workers=0` the
same function runs inline: one process, decoding between model batches.

An image that cannot be used comes back as `Skipped(reason, detail)` with the reasons
of mm/samples.py (`bad_image`, `missing_image`, ...; `bad_shard` for a shard that broke).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from mm.samples import BadSample, sample_image
from vision.preprocess import ImageError, ImageTransform, load_image

_WORKER: dict = {}  # a worker process's transform and draft size, set once by `_init`


@dataclass(frozen=True)
class Skipped:
    reason: str
    detail: str


def decode_one(source, transform: ImageTransform, draft_size: int | None) -> np.ndarray | Skipped:
    """A path or a shard sample -> `transform.fit` pixels, or Skipped saying why not."""
    try:
        if isinstance(source, Exception):  # the unit's reader already knows it is broken
            raise source
        if isinstance(source, dict):
            return transform.fit(sample_image(source, draft_size=draft_size))
        return transform.fit(load_image(source, draft_size=draft_size))
    except BadSample as e:
        return Skipped(e.reason, e.detail)
    except ImageError as e:
        return Skipped("bad_image", str(e))
    except FileNotFoundError as e:
        return Skipped("missing_file", str(e))
    except OSError as e:
        return Skipped("bad_shard", str(e))


def decode_chunk(items: list[tuple[dict, object]], transform: ImageTransform,
                 draft_size: int | None) -> list[tuple[dict, object]]:
    return [(rec, decode_one(src, transform, draft_size)) for rec, src in items]


def _decode_in_worker(items: list[tuple[dict, object]]) -> list[tuple[dict, object]]:
    return decode_chunk(items, _WORKER["transform"], _WORKER["draft_size"])


def _init(transform: ImageTransform, draft_size: int | None) -> None:
    import torch

    torch.set_num_threads(1)  # the main process's model owns the cores' threads
    _WORKER.update(transform=transform, draft_size=draft_size)


def decoded(jobs: Iterator[tuple], transform: ImageTransform, draft_size: int | None,
            workers: int) -> Iterator[tuple]:
    """`(tag, items)` jobs -> `(tag, decoded items)` in the same order; a job whose items are None
    (a marker, e.g. "this unit ended") passes through once every job before it has come back."""
    if workers <= 0:
        for tag, items in jobs:
            yield tag, None if items is None else decode_chunk(items, transform, draft_size)
        return
    # spawn, not fork: the parent holds torch's thread pools, which a forked child can deadlock on
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init, initargs=(transform, draft_size))
    window: deque[tuple] = deque()
    try:
        for tag, items in jobs:
            window.append((tag, None if items is None else pool.submit(_decode_in_worker, items)))
            while len(window) > 2 * workers + 2:
                yield _resolve(window.popleft())
        while window:
            yield _resolve(window.popleft())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _resolve(job: tuple) -> tuple:
    tag, result = job
    return tag, result.result() if isinstance(result, Future) else result
