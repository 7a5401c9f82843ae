"""Per-shard outputs of bulk captioning: written beside the final name, renamed when complete.

One output per input unit (a shard, or the images of one folder), named after it in the
output directory: `<name>.jsonl` (the lines `mm caption` prints), `<name>.parquet` (the
same columns, via pyarrow) or `<name>.tar` (a copy of the shard with each captioned
sample's caption added as a `<task>.txt` member, every original member kept). Each is
written to `<final>.partial` and renamed with `os.replace` only after the whole unit is
done, so the final name exists exactly when the unit is complete: a rerun skips it, and
a job killed midway leaves only `.partial` files, which the rerun overwrites. A summary
(`<name>.summary.json`: captioned, skipped by reason, status) is written, also
atomically, before that rename. `--write-txt` is the fourth kind: `<stem>.txt` beside
each image, each written beside and renamed.

A file name is bytes on POSIX; Python hands undecodable ones over as lone surrogates
(`os.fsdecode`). JSON lines keep them as `\\udcXX` escapes (`json_line`), which load back
to the same string, and `os.fsencode` of that gives the original bytes.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from lm.hf import atomic_file
from mm.samples import open_shard

FORMATS = {"jsonl": ".jsonl", "parquet": ".parquet", "wds": ".tar"}
SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def json_line(obj) -> bytes:
    """One JSON line as UTF-8; a string no UTF-8 can hold (a lone surrogate from an undecodable file
    name) makes the line ASCII with `\\u` escapes instead of failing: both load to the same value."""
    try:
        return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(obj) + "\n").encode("ascii")


def output_name(source: str) -> str:
    """The stem an input's outputs are named after: a shard's file name without `.tar`."""
    name = source.rstrip("/").rsplit("/", 1)[-1]
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def atomic_write(path: Path, data: bytes) -> None:
    """`data` to `path` by way of `<path>.partial` (never half a file under the final name)."""
    atomic_file(path, lambda tmp: Path(tmp).write_bytes(data), ".partial")


def txt_path(image_path: str, extension: str) -> Path:
    p = Path(image_path)
    return p.with_name(p.stem + extension)


class Output:
    """One unit's output file: rows go to `<final>.partial`; `commit` renames it into place."""

    def __init__(self, final: Path, source: str, task: str):
        self.final, self.source, self.task = final, source, task
        self.partial = final.with_name(final.name + ".partial")

    def add(self, rows: list[dict]) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def commit(self, summary: dict) -> None:
        self._close()
        atomic_write(self.final.with_name(summary["name"] + ".summary.json"), json_line(summary))
        os.replace(self.partial, self.final)

    def abort(self, summary: dict) -> None:
        try:
            self._close()
        finally:
            self.partial.unlink(missing_ok=True)
            atomic_write(self.final.with_name(summary["name"] + ".summary.json"), json_line(summary))


class JsonlOutput(Output):
    def __init__(self, final: Path, source: str, task: str):
        super().__init__(final, source, task)
        self.file = open(self.partial, "wb")  # noqa: SIM115 (closed by commit/abort)

    def add(self, rows: list[dict]) -> None:
        self.file.write(b"".join(json_line(r) for r in rows))

    def _close(self) -> None:
        self.file.close()


def _parquet_text(value):
    # Parquet strings are UTF-8: a lone surrogate is kept as the same `\udcXX` text JSON shows.
    return value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value


class ParquetOutput(Output):
    """The JSONL lines as a table; rows are kept until the unit ends (a unit is one shard)."""

    def __init__(self, final: Path, source: str, task: str):
        super().__init__(final, source, task)
        self.rows: list[dict] = []

    def add(self, rows: list[dict]) -> None:
        self.rows.extend({k: _parquet_text(v) for k, v in r.items()} for r in rows)

    def _close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = ["key", "url"] if not self.rows or "key" in self.rows[0] else ["path"]
        types = {"confidence": pa.float64(), "unfamiliar": pa.bool_()}
        schema = pa.schema([(n, types.get(n, pa.string())) for n in
                            names + ["caption", "task", "confidence", "unfamiliar"]])
        pq.write_table(pa.Table.from_pylist(self.rows, schema=schema), self.partial)


class WdsOutput(Output):
    """A copy of the shard with `<key>.<task>.txt` added after each captioned sample's members
    (replacing one of that name); the shard is read a second time when the unit ends."""

    def __init__(self, final: Path, source: str, task: str):
        super().__init__(final, source, task)
        self.captions: dict[str, str] = {}

    def add(self, rows: list[dict]) -> None:
        self.captions.update((r["key"], r["caption"]) for r in rows)

    def _close(self) -> None:
        member = f".{self.task}.txt"
        with open_shard(self.source) as stream, tarfile.open(fileobj=stream, mode="r|*") as src, \
                tarfile.open(self.partial, "w", format=tarfile.PAX_FORMAT) as dst:
            key = None
            for info in src:
                this = base_plus_ext(info.name)[0]
                if this != key:
                    self._caption(dst, key, member)
                    key = this
                if key in self.captions and info.name == key + member:
                    continue  # an older caption for the same task: ours replaces it
                dst.addfile(info, src.extractfile(info) if info.isfile() else None)
            self._caption(dst, key, member)

    def _caption(self, dst: tarfile.TarFile, key: str | None, member: str) -> None:
        if key is None or key not in self.captions:
            return
        data = self.captions[key].encode("utf-8")
        info = tarfile.TarInfo(key + member)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        dst.addfile(info, io.BytesIO(data))


class TxtOutput(Output):
    """`--write-txt`: each caption to `<stem><extension>` beside its image, written beside and
    renamed, so a killed job never leaves a half-written caption that a rerun would take as done."""

    def __init__(self, extension: str, task: str):
        super().__init__(Path(os.devnull), "", task)
        self.extension = extension

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            atomic_write(txt_path(r["path"], self.extension), r["caption"].encode("utf-8"))

    def commit(self, summary: dict) -> None:
        pass

    def abort(self, summary: dict) -> None:
        pass


def open_output(fmt: str, output_dir: str, name: str, source: str, task: str, txt_extension: str = ".txt"):
    if fmt == "txt":
        return TxtOutput(txt_extension, task)
    final = Path(output_dir) / (name + FORMATS[fmt])
    return {"jsonl": JsonlOutput, "parquet": ParquetOutput, "wds": WdsOutput}[fmt](final, source, task)
