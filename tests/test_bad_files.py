"""Files the product reads and writes, damaged or misplaced: a calibration or adapter file that
loads is one whose every value can be used (otherwise a named CheckpointError, never a silently
wrong flag or a NaN confidence), outputs are checked before the work, a failed save names its
path and leaves what was there, and a 16-bit image costs bounded memory to convert."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from lm.config import CheckpointError
from mm.checkpoint import check_output_dir, load_checkpoint
from mm.cli import main
from mm.confidence import FILE, Calibration
from train import lora as L
from train.config import LoRAConfig
from train.finetune import set_stage
from train.lora_files import ADAPTER_FILE, load_adapters, save_adapters
from vision.preprocess import load_image

C = 8  # feature width of the calibrations written below (the micro checkpoint's is its own)
READ_ONLY = "/sys/kernel/mm-output"  # not writable even by root: the mode bits of a folder are not enough


def write_calibration(folder: Path, mean, whiten, meta) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"mean": mean.contiguous(), "whiten": whiten.contiguous()}, str(folder / FILE),
              metadata={"calibration": meta if isinstance(meta, str) else json.dumps(meta)})
    return folder


def good_meta(**changes) -> dict:
    return {"radius": 3.0, "softness": 0.3, "thresholds": {"caption": 0.4}, "info": {}, **changes}


GOOD = (torch.zeros(C), torch.eye(C))
NAN_MEAN = torch.zeros(C).index_fill(0, torch.tensor([2]), float("nan"))
INF_WHITEN = torch.eye(C).index_fill(0, torch.tensor([1]), float("inf"))
DAMAGED = [
    ("mean too short", (torch.zeros(C - 1), torch.eye(C)), good_meta(), "mean"),
    ("whiten not square", (torch.zeros(C), torch.eye(C)[:, :3]), good_meta(), "whiten"),
    ("whiten of another width", (torch.zeros(C), torch.eye(C + 2)), good_meta(), "whiten"),
    ("mean 2-D", (torch.zeros(1, C), torch.eye(C)), good_meta(), "mean"),
    ("whiten 1-D", (torch.zeros(C), torch.ones(C)), good_meta(), "whiten"),
    ("integer mean", (torch.zeros(C, dtype=torch.int32), torch.eye(C)), good_meta(), "mean"),
    ("bool whiten", (torch.zeros(C), torch.eye(C).bool()), good_meta(), "whiten"),
    ("NaN mean", (NAN_MEAN, torch.eye(C)), good_meta(), "mean"),
    ("inf whiten", (torch.zeros(C), INF_WHITEN), good_meta(), "whiten"),
    ("zero softness", GOOD, good_meta(softness=0), "softness"),
    ("negative softness", GOOD, good_meta(softness=-1.0), "softness"),
    ("NaN softness", GOOD, good_meta(softness=float("nan")), "softness"),
    ("string softness", GOOD, good_meta(softness="0.3"), "softness"),
    ("negative radius", GOOD, good_meta(radius=-2.0), "radius"),
    ("infinite radius", GOOD, good_meta(radius=float("inf")), "radius"),
    ("no radius", GOOD, {"softness": 0.3, "thresholds": {}}, "radius"),
    ("bool radius", GOOD, good_meta(radius=True), "radius"),
    ("threshold above 1", GOOD, good_meta(thresholds={"caption": 1.5}), "thresholds"),
    ("negative threshold", GOOD, good_meta(thresholds={"caption": -0.1}), "thresholds"),
    ("NaN threshold", GOOD, good_meta(thresholds={"caption": float("nan")}), "thresholds"),
    ("string threshold", GOOD, good_meta(thresholds={"caption": "high"}), "thresholds"),
    ("thresholds a list", GOOD, good_meta(thresholds=[0.4]), "thresholds"),
    ("info a string", GOOD, good_meta(info="x"), "info"),
    ("metadata a list", GOOD, [1, 2], "calibration"),
    ("metadata not JSON", GOOD, "{radius", "calibration"),
]


@pytest.mark.parametrize("name, tensors, meta, field", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_damaged_calibration_is_a_checkpoint_error_naming_the_field(tmp_path, name, tensors, meta, field):
    folder = write_calibration(tmp_path / "c", *tensors, meta)
    with pytest.raises((CheckpointError, ValueError)) as e:
        Calibration.load(folder, width=C)
    assert field in str(e.value) and str(folder) in str(e.value), str(e.value)


def test_extra_or_missing_tensors_and_no_metadata(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    save_file({"mean": torch.zeros(C)}, str(folder / FILE), metadata={"calibration": json.dumps(good_meta())})
    with pytest.raises(CheckpointError, match="whiten"):
        Calibration.load(folder, width=C)
    save_file({"mean": torch.zeros(C), "whiten": torch.eye(C)}, str(folder / FILE))
    with pytest.raises(CheckpointError, match="calibration"):
        Calibration.load(folder, width=C)


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
anything = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.text(max_size=4),
                     st.none(), st.booleans(), st.lists(st.floats(0, 1), max_size=2))


@st.composite
def calibrations(draw):
    """Mostly sound calibrations with one or two things wrong, or none."""
    n = draw(st.sampled_from([C, C, C - 1, C + 1, 0]))
    m = draw(st.sampled_from([C, C, C - 1, 1]))
    mean = torch.tensor(draw(st.lists(finite, min_size=n, max_size=n)), dtype=torch.float32)
    whiten = torch.randn(C, m) if m != C else torch.eye(C) * draw(st.floats(0.01, 10))
    if draw(st.booleans()) and mean.numel():
        mean[draw(st.integers(0, mean.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"), 1e30]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.int64]))
    meta = good_meta()
    for key in draw(st.lists(st.sampled_from(["radius", "softness", "thresholds", "info"]), max_size=2)):
        meta[key] = draw(anything) if key != "thresholds" else {"caption": draw(anything)}
    return mean.to(dtype), whiten.to(dtype), meta


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cal=calibrations())
def test_any_calibration_file_loads_sound_or_is_refused(tmp_path_factory, cal):
    """What loads gives a familiarity in [0, 1] for any finite features, and an unfamiliar
    flag that is a plain comparison; the rest is refused by name."""
    folder = write_calibration(tmp_path_factory.mktemp("cal"), *cal)
    try:
        loaded = Calibration.load(folder, width=C)
    except CheckpointError as e:
        assert str(folder / FILE) in str(e)
        return
    fam = loaded.familiarity(torch.randn(3, 4, C) * 100)
    assert torch.isfinite(fam).all() and ((0 <= fam) & (fam <= 1)).all()
    assert all(0 <= t <= 1 for t in loaded.thresholds.values()) and loaded.softness > 0


@pytest.fixture(scope="module")
def micro_copy(trained_micro, tmp_path_factory):
    """A copy of the micro checkpoint to damage (without its training state)."""
    out = tmp_path_factory.mktemp("ckpt") / "micro"
    shutil.copytree(trained_micro, out, ignore=shutil.ignore_patterns("train_state"))
    return out


def test_a_wrong_width_calibration_in_a_checkpoint_stops_the_load(micro_copy):
    """The width check against the encoder: before, a mismatched whitening matrix loaded and
    then failed, or stopped flagging, at caption time."""
    model, _ = load_checkpoint(micro_copy)
    width = model.vision.out_dim
    try:
        write_calibration(micro_copy, torch.zeros(width + 1), torch.eye(width + 1), good_meta())
        with pytest.raises(CheckpointError, match=f"width {width}"):
            load_checkpoint(micro_copy)
        write_calibration(micro_copy, torch.zeros(width), torch.eye(width), good_meta(softness=0.0))
        with pytest.raises(CheckpointError, match="softness"):
            load_checkpoint(micro_copy)
        write_calibration(micro_copy, torch.zeros(width), torch.eye(width), good_meta())
        assert load_checkpoint(micro_copy)[0].calibration.thresholds == {"caption": 0.4}
    finally:
        (micro_copy / FILE).unlink(missing_ok=True)


def test_a_full_disk_during_the_calibration_save_names_the_file_and_keeps_the_old(tmp_path, monkeypatch):
    folder = write_calibration(tmp_path / "c", *GOOD, good_meta())
    before = (folder / FILE).read_bytes()

    def full(*a, **k):
        Path(a[1]).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mm.confidence.save_file", full)
    cal = Calibration(*GOOD, 1.0, 0.1, {"caption": 0.2}, {})
    with pytest.raises(CheckpointError, match="No space left"):
        cal.save(folder)
    assert (folder / FILE).read_bytes() == before and sorted(p.name for p in folder.iterdir()) == [FILE]


# --- adapters ----------------------------------------------------------------------------------

LORA = LoRAConfig(enabled=True, rank=4, alpha=8)


def adapted(checkpoint):
    model, _ = load_checkpoint(checkpoint)
    set_stage(model, "lora", [], 0, LORA)
    L.apply_lora(model, LORA)
    return model


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_adapter_weights_are_refused_on_load(micro_copy, tmp_path, bad):
    model = adapted(micro_copy)
    saved = save_adapters(model, tmp_path / "adapters", LORA)
    from safetensors.torch import load_file

    weights = load_file(str(saved / ADAPTER_FILE))
    name = sorted(weights)[0]
    weights[name] = weights[name].clone().view(-1).index_fill(0, torch.tensor([0]), bad).view_as(weights[name])
    save_file(weights, str(saved / ADAPTER_FILE), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="non-finite") as e:
        load_adapters(adapted(micro_copy), saved)
    assert name in str(e.value)


def test_save_adapters_refuses_to_displace_a_file_or_a_foreign_folder(micro_copy, tmp_path):
    model = adapted(micro_copy)
    victim = tmp_path / "notes.txt"
    victim.write_text("mine")
    with pytest.raises(CheckpointError, match="is a file"):
        save_adapters(model, victim, LORA)
    assert victim.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("{}")
    with pytest.raises(CheckpointError, match="something else"):
        save_adapters(model, folder, LORA)
    assert (folder / "metrics.jsonl").exists()
    again = save_adapters(model, tmp_path / "adapters", LORA)  # a previous adapters folder is replaced
    assert save_adapters(model, again, LORA) == again


def test_a_full_disk_during_an_adapter_save_is_a_named_error(micro_copy, tmp_path, monkeypatch):
    model = adapted(micro_copy)
    target = save_adapters(model, tmp_path / "adapters", LORA)
    before = (target / ADAPTER_FILE).read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(CheckpointError, match=f"cannot write {target}.*No space left"):
        save_adapters(model, target, LORA)
    assert (target / ADAPTER_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapters"]  # no half-written sibling left


# --- output paths, checked before the work --------------------------------------------------------

def _no_training(monkeypatch):
    """Fail the test if the command got as far as loading a model."""
    import train.finetune

    monkeypatch.setattr(train.finetune, "from_source", lambda args: pytest.fail("loaded before checking outputs"))


@pytest.mark.parametrize("flag", ["--export", "--save-adapters"])
@pytest.mark.parametrize("where", ["read-only", "a file", "under a file"])
def test_finetune_outputs_are_checked_before_loading(micro_copy, tmp_path, monkeypatch, capsys, flag, where):
    _no_training(monkeypatch)
    (tmp_path / "f").write_text("x")
    target = {"read-only": READ_ONLY, "a file": str(tmp_path / "f"), "under a file": str(tmp_path / "f" / "out")}
    argv = ["finetune", "--from", str(micro_copy), "--data", "x.tar", "--stage", "lora", flag, target[where]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["read-only", "a file", "under a file", "a folder of something else"])
def test_train_export_is_checked_before_training(tmp_path, monkeypatch, capsys, where):
    import train.trainer

    monkeypatch.setattr(train.trainer, "train", lambda *a, **k: pytest.fail("trained before checking --export"))
    (tmp_path / "f").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    target = {"read-only": READ_ONLY, "a file": str(tmp_path / "f"), "under a file": str(tmp_path / "f" / "out"),
              "a folder of something else": str(tmp_path / "other")}
    assert main(["train", "--export", target[where], "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--export" in err and "Traceback" not in err
    assert (tmp_path / "other" / "notes.txt").exists() and not (tmp_path / "run").exists()


def test_calibrate_into_a_read_only_checkpoint_stops_before_loading(micro_copy, tmp_path, monkeypatch, capsys):
    from mm.captioner import Captioner

    monkeypatch.setattr(Captioner, "from_pretrained", lambda *a, **k: pytest.fail("loaded before the check"))
    assert main(["calibrate", "--checkpoint", "/sys/kernel"]) == 2
    assert "cannot write in /sys/kernel" in capsys.readouterr().err
    if os.geteuid() != 0:  # the mode bits stop anyone but root
        ro = tmp_path / "ro"
        shutil.copytree(micro_copy, ro)
        ro.chmod(0o555)
        try:
            assert main(["calibrate", "--checkpoint", str(ro)]) == 2
            assert "cannot write" in capsys.readouterr().err
        finally:
            ro.chmod(0o755)


@pytest.mark.parametrize("argv, named", [
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-3"], "--batch-size"),
    (["--data", "missing-*.tar"], "usable samples"), (["--data", "{}"], "usable samples"),
])
def test_calibrate_checks_options_and_data_like_eval(micro_copy, argv, named, capsys, tmp_path):
    os.chdir(tmp_path)
    assert main(["calibrate", "--checkpoint", str(micro_copy), "--fit", "64", "--held-out", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_check_output_dir_accepts_new_paths_and_its_own_kind(tmp_path):
    check_output_dir(tmp_path / "a" / "b" / "new", "--export", "config.json")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    check_output_dir(tmp_path / "ckpt", "--export", "config.json")
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "--export", "config.json")


# --- images that cost more after decoding than their pixel count says ------------------------------

@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_images_convert_in_bounded_memory(mode):
    """A 16-megapixel 16-bit PNG (a few kB compressed) once cost > 16 bytes a pixel in float64
    temporaries; now the conversion to 8 bits needs about one byte a pixel (the result) plus a band."""
    side = 4000
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    img = Image.fromarray(np.full((side, side), 40000 if mode != "F" else 0.5, dtype=dtype))
    buf = io.BytesIO()
    img.save(buf, "PNG" if mode == "I;16" else "TIFF")
    data = buf.getvalue()
    del img
    tracemalloc.start()
    try:
        out = load_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.size == (side, side) and out.getpixel((0, 0)) == ((156,) * 3 if mode != "F" else (128,) * 3)
    assert peak < 3 * side * side + len(data), f"{peak / 2**20:.0f} MiB for {side * side / 1e6:.0f} Mpx"


def test_nan_confidence_is_never_written_as_json_nan():
    """JSON has no NaN: a non-finite confidence is reported as unknown (null), and not flagged."""
    from types import SimpleNamespace

    from mm.openai_api import _judgement

    res = SimpleNamespace(stats=SimpleNamespace(confidence=[math.nan]))
    engine = SimpleNamespace(cap=SimpleNamespace(unfamiliar=lambda c, t: pytest.fail("judged a NaN")))
    assert _judgement(res, engine, "caption") == {"confidence": None, "unfamiliar": None}
    json.dumps(_judgement(res, engine, "caption"), allow_nan=False)


@pytest.mark.parametrize("bulk", [False, True])
def test_mm_caption_writes_no_nan_confidence(trained_micro, tmp_path, monkeypatch, bulk):
    """A non-finite confidence reaches `mm caption`'s JSONL (stdout/--out and --output-dir) as null."""
    from mm.captioner import Captioner
    from mm.cli import main

    real_run = Captioner.run

    def nan_run(self, *args, **kwargs):
        res = real_run(self, *args, **kwargs)
        res.confidence = [math.nan] * len(res.texts)
        return res

    monkeypatch.setattr(Captioner, "run", nan_run)
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    out = ["--output-dir", str(tmp_path / "outs")] if bulk else ["--out", str(tmp_path / "a.jsonl")]
    rc = main(["caption", str(tmp_path / "a.png"), "--checkpoint", str(trained_micro), "--max-new-tokens", "2",
               *out])
    written = (sorted((tmp_path / "outs").glob("*.jsonl")) if bulk else [tmp_path / "a.jsonl"])
    lines = [json.loads(x, parse_constant=lambda c: pytest.fail(f"{c} in the output"))
             for f in written for x in f.read_text().splitlines()]
    assert rc == 0 and len(lines) == 1
    assert lines[0]["confidence"] is None and lines[0]["unfamiliar"] is None
