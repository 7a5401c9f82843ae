"""`mm caption --output-dir / --write-txt`: per-shard outputs equal `Captioner.caption` image by
image in every format, a killed job reruns to every shard exactly once, and bad outputs, bad
images and undecodable file names are handled by name."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from mm.captioner import Captioner
from mm.cli import main
from mm.samples import DataErrors, sample_image, shard_samples
from train.data.scenes import render, sample_rng, sample_scene

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cap(trained_micro):
    return Captioner.from_pretrained(trained_micro, device="cpu")


@pytest.fixture(scope="module")
def reference(cap, synth_shards):
    """{key: caption} of the test shard, one `Captioner.caption` call per image."""
    samples = list(shard_samples(synth_shards["test"], DataErrors()))
    return {s["__key__"]: cap.caption(sample_image(s)) for s in samples}


def _caption(trained_micro, *args) -> int:
    return main(["caption", *map(str, args), "--checkpoint", str(trained_micro), "--batch-size", "8"])


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "wds"])
def test_every_format_equals_captioner_image_by_image(trained_micro, synth_shards, reference, tmp_path, fmt):
    out = tmp_path / "out"
    assert _caption(trained_micro, synth_shards["test"], "--output-dir", out, "--format", fmt, "--workers", "0") == 0
    if fmt == "jsonl":
        rows = _jsonl(out / "test-000000.jsonl")
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(out / "test-000000.parquet").to_pylist()
    else:
        copied = list(shard_samples(str(out / "test-000000.tar"), DataErrors()))
        original = list(shard_samples(synth_shards["test"], DataErrors()))
        assert [{k: v for k, v in s.items() if k != "caption.txt" and k != "__url__"} for s in copied] == \
               [{k: v for k, v in s.items() if k != "__url__"} for s in original]  # every member kept
        rows = [{"key": s["__key__"], "caption": s["caption.txt"].decode()} for s in copied]
    assert {r["key"]: r["caption"] for r in rows} == reference
    assert len(rows) == len(reference)
    summary = json.loads((out / "test-000000.summary.json").read_text())
    assert summary["status"] == "done" and summary["captioned"] == len(reference) and summary["skipped"] == {}
    assert not list(out.glob("*.partial"))


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> str:
    """Four shards of 16 scenes."""
    from train.data.shards import write_synthetic

    root = tmp_path_factory.mktemp("small_shards")
    write_synthetic(str(root), 64, seed=1, split="train", per_shard=16)
    return str(root / "train-{000000..000003}.tar")


def test_killed_job_reruns_every_shard_exactly_once(trained_micro, small_shards, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mm.cli", "caption", small_shards, "--output-dir", str(out),
           "--checkpoint", str(trained_micro), "--batch-size", "8", "--workers", "0", "--no-speculative"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("*.jsonl")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.jsonl")}
    assert 1 <= len(first) < 4, f"the kill should land after the first shard and before the last: {first}"

    assert _caption(trained_micro, small_shards, "--output-dir", out, "--workers", "0", "--no-speculative") == 0
    for shard in sorted(Path(small_shards).parent.glob("train-*.tar")):
        lines = _jsonl(out / (shard.stem + ".jsonl"))
        keys = [r["key"] for r in lines]
        assert keys == [s["__key__"] for s in shard_samples(str(shard), DataErrors())]  # none lost, none twice
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.jsonl") if p.name in first} == first  # not redone
    assert not list(out.glob("*.partial"))


def test_num_shards_split_the_job_into_disjoint_parts(trained_micro, small_shards, tmp_path, capsys):
    out = tmp_path / "out"
    spec = small_shards.replace("000003", "000002")
    for i in range(2):
        assert _caption(trained_micro, spec, "--output-dir", out, "--num-shards", "2", "--shard-index", i,
                        "--workers", "0", "--max-new-tokens", "4") == 0
    assert sorted(p.name for p in out.glob("*.jsonl")) == [f"train-00000{i}.jsonl" for i in range(3)]
    summaries = [json.loads(p.read_text()) for p in out.glob("*.summary.json")]
    assert sorted(s["captioned"] for s in summaries) == [16, 16, 16]
    capsys.readouterr()
    assert _caption(trained_micro, spec, "--output-dir", out, "--workers", "0") == 0  # all complete: nothing to do
    assert "0 units done, 0 failed, 3 already complete" in capsys.readouterr().err


def _scenes(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"scene{i}.png" for i in range(n)]
    for i, p in enumerate(paths):
        render(sample_scene(sample_rng("test", 3, i))).save(p)
    return paths


def test_write_txt_skips_captioned_images_unless_overwrite(trained_micro, cap, tmp_path):
    paths = _scenes(tmp_path / "imgs", 3)
    paths[0].with_suffix(".caption").write_text("hand written")
    args = [tmp_path / "imgs", "--write-txt", "--caption-extension", ".caption", "--prefix", "tok, ",
            "--suffix", ".", "--workers", "0"]
    assert _caption(trained_micro, *args) == 0
    expected = {p: "tok, " + cap.caption(Image.open(p)) + "." for p in paths}
    assert paths[0].with_suffix(".caption").read_text() == "hand written"
    assert all(p.with_suffix(".caption").read_text() == expected[p] for p in paths[1:])
    assert _caption(trained_micro, *args, "--overwrite") == 0
    assert all(p.with_suffix(".caption").read_text() == expected[p] for p in paths)
    assert not list((tmp_path / "imgs").glob("*.partial"))


def test_workers_skip_and_count_corrupt_images(trained_micro, cap, tmp_path):
    paths = _scenes(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    assert _caption(trained_micro, tmp_path / "imgs", "--output-dir", out, "--workers", "2") == 2
    rows = _jsonl(out / "imgs.jsonl")
    assert {r["path"]: r["caption"] for r in rows} == {str(p): cap.caption(Image.open(p)) for p in paths}
    summary = json.loads((out / "imgs.summary.json").read_text())
    assert summary["skipped"] == {"bad_image": 2} and summary["status"] == "done"
    assert sorted(Path(e["key"]).name for e in summary["examples"]) == ["broken.jpg", "empty.png"]


def test_a_shard_that_fails_fails_alone(trained_micro, synth_shards, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(synth_shards["test"], shards / "a.tar")
    data = Path(synth_shards["test"]).read_bytes()
    (shards / "b.tar").write_bytes(data[: len(data) // 2])  # truncated: its end is lost
    shutil.copy(synth_shards["test"], shards / "c.tar")
    out = tmp_path / "out"
    (out / "c.jsonl.partial").mkdir(parents=True)  # its output cannot be written
    rc = _caption(trained_micro, shards / "*.tar", "--output-dir", out, "--workers", "0", "--max-new-tokens", "4")
    err = capsys.readouterr().err
    assert rc >= 2
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["a.jsonl"]
    status = {p.name: json.loads(p.read_text())["status"] for p in out.glob("*.summary.json")}
    assert status == {"a.summary.json": "done", "b.summary.json": "failed", "c.summary.json": "failed"}
    assert "b.tar" in err and "c.tar" in err and "FAILED" in err and "IsADirectoryError" in err


@pytest.mark.parametrize("where, named", [("file", "is a file, not a directory"),
                                          ("under_file", "cannot be created")])
def test_bad_output_dir_exits_2_before_the_model_loads(synth_shards, tmp_path, capsys, where, named):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "sub"
    rc = main(["caption", synth_shards["test"], "--output-dir", str(out), "--checkpoint", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--output-dir {out} {named}" in err  # the checkpoint (missing) was never reached


@pytest.mark.parametrize("where, named", [("missing_dir", "does not exist"), ("a_dir", "is a directory")])
def test_bad_out_exits_2_before_the_model_loads(synth_shards, tmp_path, capsys, where, named):
    out = tmp_path / "nowhere" / "x.jsonl" if where == "missing_dir" else tmp_path
    rc = main(["caption", synth_shards["test"], "--out", str(out), "--checkpoint", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--out {out}" in err and named in err


@pytest.mark.parametrize("args, named", [(["--num-shards", "2"], "--num-shards and --shard-index go together"),
                                         (["--num-shards", "2", "--shard-index", "2"], "--shard-index must be in 0..1"),
                                         (["--write-txt"], "is a shard: use --output-dir"),
                                         (["--caption-extension", "a/b", "--output-dir", "o"], "--caption-extension")])
def test_bad_bulk_options_exit_2(synth_shards, tmp_path, capsys, args, named):
    args = [str(tmp_path / a) if a == "o" else a for a in args]
    if "--output-dir" not in args and "--write-txt" not in args:
        args += ["--output-dir", str(tmp_path / "o")]
    rc = main(["caption", synth_shards["test"], *args, "--checkpoint", str(tmp_path / "none")])
    assert rc == 2 and named in capsys.readouterr().err


def test_undecodable_file_names_are_written_faithfully(trained_micro, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/caf\xe9-\xff.png"  # Latin-1 bytes: not UTF-8
    render(sample_scene(sample_rng("test", 4, 0))).save(raw.decode("utf-8", "surrogateescape"))
    out = tmp_path / "out.jsonl"
    assert _caption(trained_micro, folder, "--out", out) == 0
    (line,) = _jsonl(out)
    assert os.fsencode(line["path"]) == raw and line["caption"]
    assert _caption(trained_micro, folder, "--write-txt", "--workers", "0") == 0
    assert (os.fsencode(folder) + b"/caf\xe9-\xff.txt") in [os.fsencode(p) for p in folder.iterdir()]


def test_wds_output_replaces_an_older_caption_member(trained_micro, synth_shards, tmp_path, reference):
    src = tmp_path / "in.tar"
    with tarfile.open(synth_shards["test"]) as t_in, tarfile.open(src, "w") as t_out:
        for info in t_in:
            t_out.addfile(info, t_in.extractfile(info))
            if info.name.endswith(".json"):
                old = tarfile.TarInfo(info.name.rsplit(".", 1)[0] + ".caption.txt")
                old.size = 3
                t_out.addfile(old, io.BytesIO(b"old"))
    out = tmp_path / "out"
    assert _caption(trained_micro, src, "--output-dir", out, "--format", "wds", "--workers", "0") == 0
    names = tarfile.open(out / "in.tar").getnames()
    assert len(names) == len(set(names))
    copied = {s["__key__"]: s["caption.txt"].decode() for s in shard_samples(str(out / "in.tar"), DataErrors())}
    assert copied == reference


def test_full_decode_is_captioner_and_the_draft_decode_is_close(trained_micro, cap, tmp_path):
    from vision.preprocess import load_image

    folder = tmp_path / "imgs"
    folder.mkdir()
    big = render(sample_scene(sample_rng("test", 6, 0))).resize((640, 480), Image.Resampling.BICUBIC)
    big.save(folder / "big.jpg", quality=90)
    full = cap.transform.fit(load_image(folder / "big.jpg"))
    draft = load_image(folder / "big.jpg", draft_size=2 * cap.transform.image_size)
    assert draft.width < 640 and abs(cap.transform.fit(draft).astype(int) - full).mean() < 2  # 1/2..1/8 scale
    out = tmp_path / "out"
    assert _caption(trained_micro, folder, "--output-dir", out, "--full-decode", "--workers", "0") == 0
    assert _jsonl(out / "imgs.jsonl")[0]["caption"] == cap.caption(str(folder / "big.jpg"))
