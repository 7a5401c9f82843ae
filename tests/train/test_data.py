"""The shard reader: broken data, rank/worker splits, task batching, padding, epochs."""

import io
import json
import math
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from lm.loss import IGNORE_INDEX
from train.data import shards
from train.data.reader import DataErrors, dataset_size, make_loader
from train.data.scenes import TASKS


def _transform(pil):
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255


def _encode(task, text):
    ids = list(text.encode("utf-8"))
    return [1, *ids, 2], [IGNORE_INDEX, *ids, 2]


def _text_of(ids_row, mask_row):
    n = int(mask_row.sum())
    return bytes(ids_row[1:n - 1].tolist()).decode("utf-8")


def _png(v, side=8):
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (v, v, v)).save(buf, format="PNG")
    return buf.getvalue()


def _write(path, samples):
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for s in samples:
            w.write(s)
    return str(path)


def _simple_shards(root, n_shards, per_shard, broken=None):
    broken = broken or {}
    paths = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"s{s}k{i}"
            sample = {"__key__": key, "png": _png(i), "txt": f"caption of {key}".encode()}
            if broken.get(key) == "bad_image":
                sample["png"] = b"this is not an image"
            elif broken.get(key) == "no_caption":
                del sample["txt"]
            samples.append(sample)
        paths.append(_write(root / f"d-{s:06d}.tar", samples))
    return paths


def _keys(loader):
    return [k for b in loader for k in b["keys"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_broken_samples_are_skipped_counted_and_named(tmp_path, num_workers):
    broken = {"s0k3": "bad_image", "s2k10": "bad_image", "s1k5": "no_caption", "s3k7": "no_caption"}
    paths = _simple_shards(tmp_path, 4, 25, broken)
    # Truncate shard 3 inside the data of its last member (s3k24.txt): s3k24 loses its caption.
    with tarfile.open(paths[3]) as tar:
        last = tar.getmembers()[-1]
    assert last.name == "s3k24.txt"
    data = open(paths[3], "rb").read()
    open(paths[3], "wb").write(data[: last.offset_data + 3])
    empty = tmp_path / "d-000004.tar"
    empty.write_bytes(b"")
    loader = make_loader(paths + [str(empty)], encode=_encode, image_transform=_transform, batch_size=4,
                         tasks=["caption"], num_workers=num_workers, drop_last=False, shuffle=10)
    seen = Counter(_keys(loader))
    lost = set(broken) | {"s3k24"}
    assert set(seen) == {f"s{s}k{i}" for s in range(4) for i in range(25)} - lost
    assert max(seen.values()) == 1 and len(seen) == 95
    assert loader.errors.counts == {"bad_image": 2, "missing_text": 3, "bad_shard": 2}
    named = {(e["reason"], e["url"], e["key"]) for e in loader.errors.examples}
    assert ("bad_image", paths[0], "s0k3") in named and ("bad_image", paths[2], "s2k10") in named
    assert {("missing_text", paths[1], "s1k5"), ("missing_text", paths[3], "s3k7"), ("missing_text", paths[3], "s3k24")} <= named
    assert {e["url"] for e in loader.errors.examples if e["reason"] == "bad_shard"} == {paths[3], str(empty)}
    summary = loader.errors.summary()
    assert "\n" not in summary and "skipped 7" in summary and "bad_image 2" in summary


@pytest.mark.parametrize("num_workers", [0, 1])
def test_errors_after_the_last_batch_still_reach_the_loader(tmp_path, num_workers):
    broken = {f"s0k{i}": "bad_image" for i in range(4, 7)}
    paths = _simple_shards(tmp_path, 1, 7, broken)
    loader = make_loader(paths, encode=_encode, image_transform=_transform, batch_size=4, tasks=["caption"],
                         num_workers=num_workers, shuffle=0)
    assert _keys(loader) == [f"s0k{i}" for i in range(4)]
    assert loader.errors.counts == {"bad_image": 3}


def test_two_ranks_two_workers_see_each_sample_once_per_epoch(tmp_path):
    paths = _simple_shards(tmp_path, 8, 6)
    everything = sorted(f"s{s}k{i}" for s in range(8) for i in range(6))
    loaders = [make_loader(paths, encode=_encode, image_transform=_transform, batch_size=3, tasks=["caption"],
                           num_workers=2, rank=r, world_size=2, drop_last=False, seed=3) for r in range(2)]
    orders = []
    for epoch in (0, 1):
        per_rank = []
        for loader in loaders:
            loader.set_epoch(epoch)
            per_rank.append(_keys(loader))
        assert sorted(per_rank[0] + per_rank[1]) == everything
        assert not set(per_rank[0]) & set(per_rank[1])
        orders.append(per_rank[0] + per_rank[1])
    assert orders[0] != orders[1]
    loaders[0].set_epoch(0)
    assert _keys(loaders[0]) == orders[0][: len(_keys(loaders[0]))]  # the same epoch repeats exactly


def test_too_few_shards_fail_at_construction(tmp_path):
    paths = _simple_shards(tmp_path, 3, 2)
    with pytest.raises(ValueError, match=r"3 shards cannot feed 2 ranks x 2 workers = 4 readers.*resampled=True"):
        make_loader(paths, encode=_encode, image_transform=_transform, batch_size=2, num_workers=2, rank=0, world_size=2)
    make_loader(paths, encode=_encode, image_transform=_transform, batch_size=2, num_workers=2, rank=0, world_size=2,
                resampled=True)
    with pytest.raises(FileNotFoundError, match="none of the 2 shards exists"):
        make_loader(str(tmp_path / "nope-{0..1}.tar"), encode=_encode, image_transform=_transform, batch_size=2)


def _synthetic_with_caption_only(tmp_path):
    paths = shards.write_synthetic(str(tmp_path), n=24, seed=0, per_shard=12)
    meta = {}
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta[m.name.split(".")[0]] = json.load(tar.extractfile(m))
    extra = [{"__key__": f"t{i}", "png": _png(i, 128), "txt": f"only a caption {i}".encode()} for i in range(8)]
    paths.append(_write(tmp_path / "train-000002.tar", extra))
    meta.update({s["__key__"]: {"caption": s["txt"].decode()} for s in extra})
    return paths, meta


def test_batch_mode_one_task_per_batch_fixed_padding(tmp_path):
    paths, meta = _synthetic_with_caption_only(tmp_path)
    pad_to = {"caption": 90, "describe": 240, "caption_zh": 90, "describe_zh": 200}
    loader = make_loader(paths, encode=_encode, image_transform=_transform, batch_size=4, drop_last=False,
                         pad_to=pad_to, seed=1)
    seen, tasks = [], Counter()
    for b in loader:
        task = b["task"]
        assert isinstance(task, str) and b["input_ids"].shape == (len(b["keys"]), pad_to[task])
        assert b["images"].dtype == torch.float32 and b["images"].shape[1:] == (3, 128, 128)
        pad = b["attention_mask"] == 0
        assert (b["labels"][pad] == IGNORE_INDEX).all() and (b["input_ids"][pad] == 0).all()
        for i, key in enumerate(b["keys"]):
            assert _text_of(b["input_ids"][i], b["attention_mask"][i]) == meta[key][task]
        seen += b["keys"]
        tasks[task] += 1
    assert sorted(seen) == sorted(meta) and loader.errors.total == 0
    assert len(tasks) > 1  # the draw does vary the task


def test_batch_mode_skips_samples_without_the_chosen_task(tmp_path):
    only_caption = [{"__key__": f"c{i}", "png": _png(i), "txt": b"a caption"} for i in range(10)]
    only_describe = [{"__key__": f"d{i}", "png": _png(i), "json": json.dumps({"describe": "a description"}).encode()}
                     for i in range(10)]
    paths = [_write(tmp_path / "m-0.tar", only_caption), _write(tmp_path / "m-1.tar", only_describe)]
    loader = make_loader(paths, encode=_encode, image_transform=_transform, batch_size=4, drop_last=False,
                         tasks=["caption", "describe"], shuffle=20)
    seen = 0
    for b in loader:
        assert all(k[0] == b["task"][0] for k in b["keys"])  # c-keys only in caption batches
        seen += len(b["keys"])
    assert loader.errors.counts["missing_task"] > 0 and seen + loader.errors.total == 20
    assert set(loader.errors.counts) == {"missing_task"}


def test_all_mode_gives_one_example_per_task(tmp_path):
    paths, meta = _synthetic_with_caption_only(tmp_path)
    loader = make_loader(paths, encode=_encode, image_transform=_transform, batch_size=8, task_mode="all",
                         drop_last=False)
    pairs = []
    for b in loader:
        assert isinstance(b["task"], list) and b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max())
        for i, (key, task) in enumerate(zip(b["keys"], b["task"])):
            assert _text_of(b["input_ids"][i], b["attention_mask"][i]) == meta[key][task]
            pairs.append((key, task))
    assert sorted(pairs) == sorted((k, t) for k, texts in meta.items() for t in texts if t in TASKS)
    assert len(pairs) == 24 * 4 + 8


def test_too_long_texts_are_skipped(tmp_path):
    paths, meta = _synthetic_with_caption_only(tmp_path)
    limit = 40
    loader = make_loader(paths, encode=_encode, image_transform=_transform, batch_size=2, tasks=["caption"],
                         pad_to=limit, drop_last=False)
    keys = _keys(loader)
    too_long = {k for k, m in meta.items() if len(m["caption"].encode()) + 2 > limit}
    assert 0 < len(too_long) < len(meta)
    assert sorted(keys) == sorted(set(meta) - too_long) and loader.errors.counts == {"too_long": len(too_long)}


def test_resampled_epochs_have_the_sized_length(tmp_path):
    paths = shards.write_synthetic(str(tmp_path), n=20, seed=0, per_shard=10)
    assert dataset_size(str(tmp_path / "train-{000000..000001}.tar")) == 20
    assert dataset_size(paths + [str(tmp_path / "other.tar")]) is None
    assert dataset_size(["https://example.com/a.tar"]) is None
    loader = make_loader(paths, encode=_encode, image_transform=_transform, batch_size=3, tasks=["caption"],
                         resampled=True, seed=4)
    assert loader.num_batches == math.ceil(20 / 3)
    first = [b["keys"] for b in loader]
    assert len(first) == loader.num_batches and first == [b["keys"] for b in loader]
    loader.set_epoch(1)
    assert [b["keys"] for b in loader] != first


def test_data_errors_bounded_and_mergeable():
    worker, main = DataErrors(max_examples=3), DataErrors(max_examples=4)
    for i in range(5):
        worker.add("bad_image", "u.tar", f"k{i}")
    main.merge(worker.drain())
    assert worker.drain() is None
    worker.add("missing_text", "v.tar", "k9")
    main.merge(worker.drain())
    assert main.counts == {"bad_image": 5, "missing_text": 1} and len(main.examples) == 4
    assert main.summary().startswith("data: skipped 6 (bad_image 5, missing_text 1); first: bad_image in u.tar key k0")
