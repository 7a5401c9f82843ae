"""The webdataset sample schema, and the skip-and-count rules every reader of samples shares.

A sample is a `__key__`, an image member (`jpg`/`png`/`webp`/...) and text: `json` (an
object keyed by task) and/or `txt` (the caption, UTF-8). The training reader, the
tokenizer pass, `mm eval` and `mm caption` all read shards and samples through this
module, so a broken sample is skipped for the same reason everywhere and counted
under one of `REASONS`, with its shard URL and key:

- `bad_shard`: a shard that cannot be opened, or is empty, truncated or not a tar. Its
  samples up to the break are kept; the rest of it is lost (no count of those exists).
- `bad_json`, `bad_text` (a `txt` that is not UTF-8), `missing_text`, `missing_image`,
  `bad_image` (undecodable, or over the pixel cap that captioning also applies).
- The training reader adds `missing_task` and `too_long`.

Nothing here raises on bad data: a reader gets a value, or a `BadSample` it counts.

A shard URL is opened without a shell (`open_shard`): a name that exists on disk is a
file, whatever it looks like; `http(s)://` is fetched by urllib; webdataset's
`pipe:CMD` runs CMD in a shell, so it is refused unless the caller opts in
(`allow_pipe`, set only from a training config's `data.allow_pipe`). A file name
from a glob or a folder listing can never start a command.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar

import webdataset as wds
from webdataset.autodecode import IMAGE_EXTENSIONS
from webdataset.tariterators import group_by_keys, tar_file_iterator

from mm.config import TASKS
from vision.preprocess import DEFAULT_MAX_PIXELS, ImageError, load_image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp") + tuple(e for e in IMAGE_EXTENSIONS if e not in ("jpg", "jpeg", "png", "webp"))
__all__ = ["IMAGE_KEYS", "REASONS", "TASKS", "BadSample", "DataErrors", "PipeRefused", "expand_urls", "good_samples", "open_shard", "sample_image",
           "sample_json", "sample_texts", "shard_samples"]
T = TypeVar("T")
REASONS = ("bad_shard", "bad_json", "bad_text", "missing_text", "missing_image", "bad_image", "missing_task",
           "too_long")


class BadSample(ValueError):
    """A sample to skip; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class DataErrors:
    """Skipped samples: counts by reason plus the first `max_examples` (reason, url, key, detail)."""

    def __init__(self, max_examples: int = 100):
        self.counts: Counter = Counter()
        self.examples: list[dict] = []
        self.max_examples = max_examples

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, url: str, key: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append({"reason": reason, "url": url, "key": key, "detail": detail[:200]})

    def merge(self, record: dict) -> None:
        self.counts.update(record["counts"])
        self.examples.extend(record["examples"][: self.max_examples - len(self.examples)])

    def drain(self) -> dict | None:
        """The records made since the last drain, as plain data that survives a worker boundary."""
        if not self.counts:
            return None
        record = {"counts": dict(self.counts), "examples": self.examples}
        self.counts, self.examples = Counter(), []
        return record

    def summary(self) -> str:
        if not self.counts:
            return "data: no samples skipped"
        by_reason = ", ".join(f"{r} {n}" for r, n in self.counts.most_common())
        first = self.examples[0] if self.examples else None
        where = f"; first: {first['reason']} in {first['url']} key {first['key'] or '?'}" if first else ""
        return f"data: skipped {self.total} ({by_reason}){where}"

    def __repr__(self) -> str:
        return f"DataErrors({self.summary()})"


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard URLs with brace patterns expanded (`train-{000..009}.tar`) and `a::b` split, also
    inside each item of a list."""
    specs = [urls] if isinstance(urls, str) else list(urls)
    return [u for spec in specs for u in wds.shardlists.expand_urls(spec)]


class PipeRefused(ValueError):
    """A `pipe:` shard URL where no explicit opt-in allows running shell commands."""


def open_shard(url: str, allow_pipe: bool = False):
    """A binary stream of one shard. Nothing reaches a shell unless `allow_pipe` and the URL is `pipe:`."""
    path = url.removeprefix("file:") if url.startswith("file:") and not os.path.exists(url) else url
    if os.path.exists(path):
        return open(path, "rb")
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=60)  # noqa: S310 (the scheme is checked above)
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise PipeRefused("a pipe: shard URL runs a shell command and is refused here; set "
                              "data.allow_pipe in a training config to run it, or name a local file")
        return wds.gopen(url)
    raise FileNotFoundError(f"no such file: {path}")


def _members(stream, url: str, failed: list) -> Iterator[dict]:
    last = ""  # the member read before the failure: says where the shard broke
    try:
        for f in tar_file_iterator(stream):
            f["__url__"], last = url, f["fname"]
            yield f
    except Exception as e:  # truncated, empty or not a tar: the rest of this shard is lost
        failed.append(("bad_shard", url, last, f"{type(e).__name__}: {e}"))


def shard_samples(url: str, errors: DataErrors, allow_pipe: bool = False) -> Iterator[dict]:
    """The raw samples ({'__key__', '__url__', ext: bytes}) of one shard. A broken shard is counted
    once; its last, partial sample is still yielded (the readers' rules then judge it)."""
    failed: list[tuple] = []
    try:
        stream = open_shard(url, allow_pipe)
    except Exception as e:  # missing file, bad URL, a refused or failed pipe: command
        errors.add("bad_shard", url, "", f"{type(e).__name__}: {e}")
        return
    try:
        yield from group_by_keys(_members(stream, url, failed))
    except ValueError as e:  # a repeated member name inside the shard
        failed.append(("bad_shard", url, "", str(e)))
    finally:
        try:
            stream.close()  # a `pipe:` command reports its failure here
        except Exception as e:
            failed.append(("bad_shard", url, "", f"{type(e).__name__}: {e}"))
    if failed:
        errors.add(*failed[0])


def good_samples(urls: str | list[str], errors: DataErrors, parse: Callable[[dict], T],
                 allow_pipe: bool = False) -> Iterator[T]:
    """`parse(sample)` of every sample in the shards, in order; a sample it refuses (BadSample) is
    counted in `errors` with its shard and key, and skipped. One process reads every shard."""
    for url in expand_urls(urls):
        for sample in shard_samples(url, errors, allow_pipe):
            try:
                yield parse(sample)
            except BadSample as e:
                errors.add(e.reason, url, sample.get("__key__", "?"), e.detail)


def sample_json(sample: dict) -> dict:
    """The `json` member as a dict ({} when there is none)."""
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"])
    except (ValueError, RecursionError) as e:  # ValueError covers bytes that are not UTF-8
        raise BadSample("bad_json", f"{type(e).__name__}: {e}") from e
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"json is a {type(meta).__name__}, expected an object keyed by task")
    return meta


def sample_texts(sample: dict, tasks: tuple[str, ...] | list[str], meta: dict | None = None) -> dict[str, str]:
    """{task: text} for the tasks the sample has: from json, then `txt` as the caption."""
    meta = sample_json(sample) if meta is None else meta
    texts = {t: meta[t].strip() for t in tasks if isinstance(meta.get(t), str) and meta[t].strip()}
    if "caption" in tasks and "caption" not in texts and "txt" in sample:
        try:
            caption = bytes(sample["txt"]).decode("utf-8").strip()
        except UnicodeDecodeError as e:  # replacing bytes with U+FFFD would train on garbage
            raise BadSample("bad_text", f"txt is not UTF-8 ({e})") from e
        texts.update({"caption": caption} if caption else {})
    texts = {t: texts[t] for t in tasks if t in texts}  # in task order, wherever each came from
    if not texts:
        raise BadSample("missing_text", f"none of {list(tasks)} in {sorted(k for k in sample if not k.startswith('__'))}")
    return texts


def sample_image(sample: dict, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None):
    """The sample's image as an upright RGB PIL image, with the captioner's pixel cap (`draft_size`:
    see `load_image`)."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise BadSample("missing_image", f"no image member in {sorted(k for k in sample if not k.startswith('__'))}")
    try:
        return load_image(bytes(sample[key]), max_pixels=max_pixels, draft_size=draft_size)
    except ImageError as e:
        raise BadSample("bad_image", f"{key}: {e}") from e
