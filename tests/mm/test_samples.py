"""The shared sample schema: any sample either decodes or is a BadSample with one of the known
reasons, and any shard (random bytes, or a real shard cut anywhere) yields a prefix of its
samples and at most one bad_shard record, never an exception."""

import io
import json

import pytest
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mm.samples import REASONS, BadSample, DataErrors, sample_image, sample_json, sample_texts, shard_samples
from train.data.scenes import TASKS

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.function_scoped_fixture])


def _png(side=4, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (side, side)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
TEXTS = st.text(max_size=12)
MEMBER_BYTES = st.one_of(
    st.binary(max_size=40),
    st.just(PNG), st.just(PNG[: len(PNG) // 2]), st.just(_png(3, "RGBA")), st.just(_png(2, "I;16")),
    TEXTS.map(lambda t: t.encode("utf-8")),
    st.just(b"caf\xe9 au lait"),  # Latin-1, not UTF-8
    st.dictionaries(st.sampled_from(list(TASKS) + ["scene", "x"]), st.none() | TEXTS | st.integers(), max_size=4)
    .map(lambda d: json.dumps(d).encode()),
    st.sampled_from([b"[1, 2]", b"null", b"\"a caption\"", b"{", b"[" * 5000]),
)
SAMPLES = st.dictionaries(st.sampled_from(["txt", "json", "png", "jpg", "webp", "cls", "TXT"]), MEMBER_BYTES,
                          max_size=4)


@SETTINGS
@given(SAMPLES, st.lists(st.sampled_from(TASKS), min_size=1, max_size=4, unique=True))
def test_any_sample_decodes_or_is_a_counted_bad_sample(sample, tasks):
    try:
        texts = sample_texts(sample, tasks)
        image = sample_image(sample)
    except BadSample as e:
        assert e.reason in REASONS
        return
    assert texts and set(texts) <= set(tasks) and list(texts) == [t for t in tasks if t in texts]
    assert all(isinstance(t, str) and t and t == t.strip() for t in texts.values())
    assert image.mode == "RGB" and min(image.size) >= 1


def test_non_utf8_caption_is_bad_text_not_replacement_characters():
    sample = {"txt": b"caf\xe9 au lait", "png": PNG}
    with pytest.raises(BadSample) as e:
        sample_texts(sample, ["caption"])
    assert e.value.reason == "bad_text"
    json_wins = {**sample, "json": json.dumps({"caption": "cafe"}).encode()}
    assert sample_texts(json_wins, ["caption"]) == {"caption": "cafe"}  # txt is not needed, so not judged


@pytest.mark.parametrize("raw, reason", [(b"", "bad_json"), (b"{", "bad_json"), (b"[1]", "bad_json"),
                                         (b"\xff\xfe{", "bad_json"), (b"[" * 100000, "bad_json")])
def test_broken_json_is_bad_json(raw, reason):
    with pytest.raises(BadSample) as e:
        sample_json({"json": raw})
    assert e.value.reason == reason


def test_pixel_cap_is_the_captioners(tmp_path):
    """A 9000x9000 image (81 Mpx, under PIL's own bomb limit) is refused from its header."""
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")  # 1 bit per pixel: a small file
    with pytest.raises(BadSample) as e:
        sample_image({"png": buf.getvalue()})
    assert e.value.reason == "bad_image" and "over the limit of 64000000" in e.value.detail


def _shard(path, n=5) -> bytes:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for i in range(n):
            w.write({"__key__": f"k{i}", "png": PNG, "txt": f"caption {i}".encode()})
    return path.read_bytes()


@SETTINGS
@given(cut=st.integers(0, 10**6), junk=st.binary(max_size=600))
def test_a_shard_cut_anywhere_yields_a_prefix(tmp_path_factory, cut, junk):
    root = tmp_path_factory.mktemp("cut")
    whole = _shard(root / "whole.tar")
    cut = cut % (len(whole) + 1)
    path = root / "cut.tar"
    path.write_bytes(whole[:cut] + (junk if cut < len(whole) else b""))
    errors = DataErrors()
    keys = [s["__key__"] for s in shard_samples(str(path), errors)]
    assert keys == [f"k{i}" for i in range(len(keys))]  # a prefix, in order, no repeats
    assert set(errors.counts) <= {"bad_shard"} and errors.total <= 1
    if cut == len(whole):
        assert len(keys) == 5 and errors.total == 0


@SETTINGS
@given(st.binary(max_size=3000))
def test_random_bytes_as_a_shard(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("junk") / "junk.tar"
    path.write_bytes(data)
    errors = DataErrors()
    for s in shard_samples(str(path), errors):
        try:
            sample_texts(s, TASKS)
            sample_image(s)
        except BadSample as e:
            assert e.reason in REASONS
    assert errors.total <= 1


def test_missing_and_empty_shards_are_bad_shards(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    errors = DataErrors()
    assert list(shard_samples(str(tmp_path / "nope.tar"), errors)) == []
    assert list(shard_samples(str(tmp_path / "empty.tar"), errors)) == []
    assert errors.counts == {"bad_shard": 2}
    assert "FileNotFoundError" in errors.examples[0]["detail"]
