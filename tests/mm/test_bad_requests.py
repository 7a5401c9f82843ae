"""The Python API on bad requests: decoding options and checkpoint directories that cannot work
are refused with a ValueError naming the option or the file, before any decoding; any options a
caller passes either caption or raise ConfigError."""

import math
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from lm.config import ConfigError
from mm.captioner import Captioner
from mm.checkpoint import CheckpointError
from mm.model import CaptionModel
from mm.tokenizer import Tokenizer

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for conftest helpers
from conftest import micro_config  # noqa: E402


@pytest.fixture(scope="module")
def random_cap():
    """A randomly initialised micro captioner: the options' plumbing, not its captions, is tested."""
    tok = Tokenizer.train(["a red circle", "a small blue square"] * 20, vocab_size=300)
    model = CaptionModel(micro_config(vocab_size=tok.vocab_size), image_token_id=tok.image_id)
    return Captioner(model, tok, batch_size=2)


IMAGE = Image.new("RGB", (32, 32), (200, 40, 40))


@pytest.mark.parametrize("options, named", [
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(repetition_penalty=math.nan), "repetition_penalty"), (dict(num_beams=1000), "num_beams"),
    (dict(max_new_tokens="5"), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(top_p=math.nan, temperature=0.5), "top_p"), (dict(seed="7", temperature=0.5), "seed"),
])
def test_bad_options_are_refused_by_name(random_cap, options, named):
    with pytest.raises(ValueError, match=named):
        random_cap.caption(IMAGE, **options)
    with pytest.raises(ValueError, match=named):
        next(random_cap.stream(IMAGE, **options))


OPTION_VALUES = {
    "max_new_tokens": st.integers(-2, 6) | st.sampled_from([2.0, "3", None, True]),
    "min_new_tokens": st.integers(-1, 3) | st.sampled_from([1.5, "1"]),
    "num_beams": st.integers(0, 3) | st.sampled_from([17, 2.0, "2"]),
    "temperature": st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0, 0.7, 101, "0.5"]),
    "top_k": st.integers(-1, 600) | st.sampled_from([0.5, "5"]),
    "top_p": st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1, 0.9, 0]),
    "repetition_penalty": st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1, 1.3, 0]),
    "length_penalty": st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1, -1]),
    "speculative": st.booleans() | st.sampled_from([0, "yes"]),
    "draft_tokens": st.none() | st.integers(-1, 9) | st.sampled_from([2.0]),
    "seed": st.none() | st.integers(-1, 2**64) | st.sampled_from([1.5]),
}


GOOD_VALUES = {  # so that about half of the examples really decode
    "max_new_tokens": st.integers(1, 6), "min_new_tokens": st.integers(0, 2), "num_beams": st.integers(1, 3),
    "temperature": st.just(0.0) | st.floats(0.05, 100), "top_k": st.integers(0, 600),
    "top_p": st.floats(0.05, 1.0), "repetition_penalty": st.floats(0.5, 2.0), "length_penalty": st.floats(-2, 2),
    "speculative": st.booleans(), "draft_tokens": st.none() | st.integers(1, 8),
    "seed": st.none() | st.integers(0, 2**64 - 1),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({}, optional=GOOD_VALUES) | st.fixed_dictionaries({}, optional=OPTION_VALUES))
def test_any_options_caption_or_raise_config_error(random_cap, options):
    if isinstance(options.get("max_new_tokens"), int) and not isinstance(options["max_new_tokens"], bool):
        options["max_new_tokens"] = min(options["max_new_tokens"], 6)  # keep a random model's captions short
    try:
        texts = random_cap.caption([IMAGE, IMAGE], **options)
    except ConfigError:
        event("refused")
        return
    event("captioned")
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def _copy(trained_micro, tmp_path, name="ckpt") -> Path:
    path = tmp_path / name
    shutil.copytree(trained_micro, path)
    return path


@pytest.mark.parametrize("damage", ["empty", "truncated", "junk"])
def test_damaged_weights_are_a_checkpoint_error_naming_the_file(trained_micro, tmp_path, damage):
    path = _copy(trained_micro, tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "truncated": data[: len(data) - 100], "junk": b"\x08" + data[1:]}[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        Captioner.from_pretrained(path, device="cpu")


def test_other_damaged_checkpoint_files(trained_micro, tmp_path):
    bad_tok = _copy(trained_micro, tmp_path, "tok")
    (bad_tok / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        Captioner.from_pretrained(bad_tok, device="cpu")
    bad_cfg = _copy(trained_micro, tmp_path, "cfg")
    (bad_cfg / "config.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON") as e:
        Captioner.from_pretrained(bad_cfg, device="cpu")
    assert str(e.value).count("config.json") == 1  # the file is named once
    unknown_model = _copy(trained_micro, tmp_path, "timm")
    text = (unknown_model / "config.json").read_text().replace('"test_resnet"', '"no_such_timm_model"')
    (unknown_model / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"config\.json: cannot build the model"):
        Captioner.from_pretrained(unknown_model, device="cpu")


@pytest.mark.parametrize("device", ["tpu", "cuda:99", "", "meta"])
def test_unusable_device_is_refused_before_loading(trained_micro, device):
    with pytest.raises(ConfigError, match="device"):
        Captioner.from_pretrained(trained_micro, device=device)


def test_a_vanishing_temperature_samples_the_greedy_caption(random_cap):
    """temperature=1e-123 once divided the logits into inf and sampled from nan probabilities."""
    greedy = random_cap.caption([IMAGE], max_new_tokens=6)
    assert random_cap.caption([IMAGE], max_new_tokens=6, temperature=1e-123, seed=0) == greedy
