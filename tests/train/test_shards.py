"""Shard writers: reproducible synthetic shards and the folder converter's round trip."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from train.data import scenes, shards


def _read_tar(path):
    """{key: {ext: bytes}} straight from the tar, independent of the reader under test."""
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_synth_is_reproducible_and_exact(tmp_path):
    a = shards.write_synthetic(str(tmp_path / "a"), n=25, seed=7, per_shard=10)
    b = shards.write_synthetic(str(tmp_path / "b"), n=25, seed=7, per_shard=10, workers=2)
    assert [os.path.basename(p) for p in a] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for pa, pb in zip(a, b):
        assert open(pa, "rb").read() == open(pb, "rb").read()
    sizes = json.load(open(tmp_path / "a" / "sizes.json"))
    assert sizes == {"train-000000.tar": 10, "train-000001.tar": 10, "train-000002.tar": 5}

    samples = {k: v for p in a for k, v in _read_tar(p).items()}
    assert len(samples) == 25
    for i, (key, s) in enumerate(sorted(samples.items())):
        assert key == f"{i:08d}"
        meta = json.loads(s["json"])
        scene = scenes.Scene.from_dict(meta["scene"])
        assert scene == scenes.sample_scene(scenes.sample_rng("train", 7, i))
        assert {t: meta[t] for t in scenes.TASKS} == scenes.texts(scene)
        assert s["txt"].decode() == meta["caption"]
        png = Image.open(io.BytesIO(s["png"]))
        assert png.format == "PNG" and np.array_equal(np.asarray(png.convert("RGB")), np.asarray(scenes.render(scene)))


def test_synth_splits_differ_and_share_sizes_json(tmp_path):
    train = shards.write_synthetic(str(tmp_path), n=12, seed=0, split="train", per_shard=6)
    val = shards.write_synthetic(str(tmp_path), n=12, seed=0, split="val", per_shard=6)
    texts = [{json.loads(s["json"])["describe"] for p in paths for s in _read_tar(p).values()} for paths in (train, val)]
    assert len(texts[0] & texts[1]) < 3  # a coincidence is possible, a shared seed space is not
    sizes = json.load(open(tmp_path / "sizes.json"))
    assert sorted(sizes) == ["train-000000.tar", "train-000001.tar", "val-000000.tar", "val-000001.tar"]
    # Rewriting one split replaces only its own entries.
    shards.write_synthetic(str(tmp_path), n=5, seed=1, split="val", per_shard=6)
    sizes = json.load(open(tmp_path / "sizes.json"))
    assert sizes == {"train-000000.tar": 6, "train-000001.tar": 6, "val-000000.tar": 5}


def _make_folder(root, n=50):
    """Mixed png/jpg images, every fifth one large; returns the caption rows."""
    rng = np.random.default_rng(0)
    rows = []
    os.makedirs(root / "sub")
    for i in range(n):
        large = i % 5 == 0
        w, h = (300, 150) if large else (40 + i, 30)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        rel = f"sub/img{i}.png" if i % 2 else f"img{i}.jpg"
        img.save(root / rel)
        rows.append({"path": rel, "caption": f"picture number {i}"})
    return rows


def test_convert_round_trip(tmp_path):
    src = tmp_path / "images"
    rows = _make_folder(src)
    (src / "broken.jpg").write_bytes(b"not really a jpeg")
    bad = [{"path": "missing.png", "caption": "gone"}, {"path": "broken.jpg", "caption": "broken"},
           {"path": "img2.jpg", "caption": "   "}]
    with open(tmp_path / "captions.jsonl", "w") as f:
        for r in rows[:20] + bad + rows[20:]:
            f.write(json.dumps(r) + "\n")
    reported = []
    stats = shards.convert_folder(str(src), str(tmp_path / "out"), str(tmp_path / "captions.jsonl"), per_shard=16,
                                  max_size=100, report=lambda row, reason, detail: reported.append((row, reason)))
    assert reported == [("line 21", "missing file"), ("line 22", "not an image"), ("line 23", "empty caption")]
    assert stats["written"] == 50 and stats["rows"] == 53 and stats["resized"] == 10 and len(stats["shards"]) == 4
    assert json.load(open(tmp_path / "out" / "sizes.json")) == {
        "shard-000000.tar": 16, "shard-000001.tar": 16, "shard-000002.tar": 16, "shard-000003.tar": 2}

    by_source = {}
    for p in stats["shards"]:
        for s in _read_tar(p).values():
            by_source[json.loads(s["json"])["source"]] = s
    assert len(by_source) == 50
    for i, r in enumerate(rows):
        s, original = by_source[r["path"]], (src / r["path"]).read_bytes()
        assert s["txt"].decode() == r["caption"] == json.loads(s["json"])["caption"]
        ext = "png" if r["path"].endswith(".png") else "jpg"
        img = Image.open(io.BytesIO(s[ext]))
        if i % 5 == 0:  # 300x150 shrunk to a 100 px long side, same aspect, same format
            assert img.size == (100, 50) and img.format == ("PNG" if ext == "png" else "JPEG")
        else:
            assert s[ext] == original
        if ext == "png":
            want = Image.open(src / r["path"])
            if i % 5 == 0:
                want = want.resize((100, 50), Image.BICUBIC)
            assert np.array_equal(np.asarray(img), np.asarray(want))


def test_convert_side_files_and_csv(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(src / f"a{i}.png")
    (src / "a0.txt").write_text("first\n")
    (src / "a1.txt").write_text("second")
    stats = shards.convert_folder(str(src), str(tmp_path / "out"))
    assert stats["written"] == 2 and [e[:2] for e in stats["errors"]] == [("a2.png", "missing caption")]
    captions = sorted(s["txt"].decode() for s in _read_tar(stats["shards"][0]).values())
    assert captions == ["first", "second"]

    (tmp_path / "c.csv").write_text('path,caption\na0.png,"one, with comma"\na2.png,two\n')
    stats = shards.convert_folder(str(src), str(tmp_path / "csv"), str(tmp_path / "c.csv"))
    assert sorted(s["txt"].decode() for s in _read_tar(stats["shards"][0]).values()) == ["one, with comma", "two"]
    (tmp_path / "bad.csv").write_text("file,text\na0.png,x\n")
    with pytest.raises(ValueError, match="need columns 'path' and 'caption'"):
        shards.convert_folder(str(src), str(tmp_path / "bad"), str(tmp_path / "bad.csv"))


def test_command_line(tmp_path, capsys):
    assert shards.main(["synth", "--out", str(tmp_path / "s"), "--n", "3", "--seed", "2", "--split", "test"]) == 0
    assert json.load(open(tmp_path / "s" / "sizes.json")) == {"test-000000.tar": 3}
    src = tmp_path / "img"
    src.mkdir()
    Image.new("RGB", (8, 8)).save(src / "x.png")
    (src / "x.txt").write_text("a black square")
    (src / "y.png").write_bytes(b"\x89PNG broken")
    (src / "y.txt").write_text("broken")
    assert shards.main(["convert", "--images", str(src), "--out", str(tmp_path / "c")]) == 0
    captured = capsys.readouterr()
    assert "skipped y.png: not an image" in captured.err
    assert "converted 1 of 2 rows" in captured.out and "not an image 1" in captured.out
    with pytest.raises(SystemExit):
        shards.main(["synth", "--out", str(tmp_path), "--n", "3", "--split", "dev"])
