"""Broken training data: the tokenizer pass and the reader skip and count by the same rules, and
every count (also those met after an epoch's last batch) reaches the run's summary and metrics."""

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from mm.tokenizer import Tokenizer
from train import trainer as T
from train.data.reader import make_loader
from train.parallel import dist as D

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for conftest helpers
from conftest import micro_train_config  # noqa: E402


def _png(v: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (v, 40, 200 - v)).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for s in samples:
            w.write(s)
    return str(path)


def _good(prefix: str, n: int) -> list[dict]:
    return [{"__key__": f"{prefix}{i}", "png": _png(i), "txt": f"a shape number {i}".encode()} for i in range(n)]


def _huge_png() -> bytes:
    """9000 x 9000 (81 Mpx: under PIL's own limit, over the 64 Mpx cap captioning applies); 1 bit deep."""
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")
    return buf.getvalue()


BAD = [{"__key__": "huge", "png": _huge_png(), "txt": b"a huge image"},  # bad_image
       {"__key__": "latin1", "png": _png(1), "txt": b"caf\xe9 au lait"},  # bad_text
       {"__key__": "empty_json", "png": _png(2), "json": b""},  # bad_json
       {"__key__": "list_json", "png": _png(3), "json": b"[1, 2]"},  # bad_json
       {"__key__": "tail", "png": _png(4), "txt": b"cut off here"}]


@pytest.fixture
def broken_shards(tmp_path):
    """Two good shards of 16 and, read last, a shard of 3 good samples and the BAD ones, cut inside
    its last member: bad_image 1, bad_text 1, bad_json 2, bad_shard 1 (and 'tail' loses its caption:
    missing_text 1)."""
    root = tmp_path / "shards"
    root.mkdir()
    _write(root / "s-0.tar", _good("a", 16))
    _write(root / "s-1.tar", _good("b", 16))
    last = _write(root / "s-2.tar", _good("c", 3) + BAD)
    with tarfile.open(last) as tar:
        member = tar.getmembers()[-1]
    assert member.name == "tail.txt"
    Path(last).write_bytes(Path(last).read_bytes()[: member.offset_data + 3])
    return str(root / "s-{0..2}.tar")


EXPECTED = {"bad_image": 1, "bad_text": 1, "bad_json": 2, "bad_shard": 1, "missing_text": 1}
TEXT_RULES = {k: v for k, v in EXPECTED.items() if k != "bad_image"}  # the tokenizer pass decodes no image


def test_reader_counts_each_broken_sample(broken_shards):
    loader = make_loader(broken_shards, encode=lambda task, text: ([1, 2], [1, 2]), image_transform=lambda im: torch.zeros(1),
                         batch_size=8, tasks=["caption"], shuffle=0, num_workers=0)
    assert sum(len(b["keys"]) for b in loader) == 32  # 32 + 3 good; the 3 do not fill a batch (drop_last)
    assert loader.errors.counts == EXPECTED


def test_tokenizer_pass_skips_and_counts(broken_shards, tmp_path, capsys):
    cfg = micro_train_config({"train": broken_shards}, tmp_path / "run", tokenizer_samples=1000)
    tok = T.build_tokenizer(cfg, D.DistInfo(), tmp_path / "run")  # says what it skipped with print
    assert tok.decode(tok.encode("a shape number 7")) == "a shape number 7"
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    said = capsys.readouterr().out
    assert "trained on 36 texts" in said and all(f"{r} {n}" in said for r, n in TEXT_RULES.items()), said


def test_epoch_end_errors_reach_the_metrics_and_summary(broken_shards, tmp_path, capsys):
    tok = Tokenizer.train([s["txt"].decode() for s in _good("x", 16)] * 4, vocab_size=300)
    tok.save(tmp_path / "tok.json")
    cfg = micro_train_config({"train": broken_shards}, tmp_path / "run", tokenizer=str(tmp_path / "tok.json"),
                             log_every=5, save_every=100)
    cfg = cfg.replace(data=cfg.data.replace(tasks=["caption"], resampled=False, shuffle=0),
                      optim=cfg.optim.replace(batch_size=8, max_steps=5))
    T.train(cfg)  # epoch 0 is 4 batches; every error comes after its last one; step 5 is in epoch 1
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 5 and record["data_errors"] == sum(EXPECTED.values())
    assert record["data_errors_by_reason"] == EXPECTED
    out = capsys.readouterr()
    assert "data: skipped 6" in out.out + out.err
