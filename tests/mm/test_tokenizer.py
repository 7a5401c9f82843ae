"""Tokenizer: exact round trips, fixed special ids, sequence layout, files, foreign tokenizers, streaming."""

import json
import random
import warnings

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import models, pre_tokenizers

from mm.tokenizer import IGNORE_INDEX, StreamDecoder, Tokenizer

EN = "a large red circle, a small blue square and a small yellow diamond"
ZH = "一个大的红色圆形、一个小的蓝色正方形和一个小的黄色菱形。"


def _corpus(n=300):
    rng = random.Random(0)
    sizes, colours, shapes = ["small", "large"], ["red", "green", "blue", "yellow"], ["circle", "square"]
    zh_colours, zh_shapes = ["红色", "绿色", "蓝色", "黄色"], ["圆形", "正方形", "三角形", "菱形"]
    for _ in range(n):
        yield f"a {rng.choice(sizes)} {rng.choice(colours)} {rng.choice(shapes)} on the left."
        yield f"一个{rng.choice(['大的', '小的'])}{rng.choice(zh_colours)}{rng.choice(zh_shapes)}、左上方。"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(_corpus(), vocab_size=512)


def test_special_ids_are_fixed(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id) == (0, 1, 2, 3)
    assert 260 < tok.vocab_size == len(tok) <= 512  # stops early once no pair is frequent enough
    with pytest.raises(ValueError, match="vocab_size=100"):
        Tokenizer.train(["x"], vocab_size=100)


@pytest.mark.parametrize("text", [
    EN, ZH, "Hello, world! It's 3.14 -- (ok)?\n  two  spaces\tand a tab.", "描述：白色背景上有一个图形。",
    "unseen: 龘 emoji 🙂 and ümlauts", " leading and trailing ", "a <image> and <eos> written as text",
])
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not {tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id} & set(ids)


def test_training_merges_frequent_words(tok):
    assert len(tok.encode("a large red circle")) < len("a large red circle") / 2
    assert len(tok.encode("红色圆形")) < len("红色圆形".encode())


def test_layout_and_labels(tok):
    ids, labels = tok.build_example("Caption:", EN, num_image_tokens=4)
    prompt, caption = tok.encode("Caption:"), tok.encode(EN)
    assert ids == [0] + [3] * 4 + prompt + caption + [1]
    assert labels == [IGNORE_INDEX] * (5 + len(prompt)) + caption + [1]
    assert len(ids) == len(labels)
    assert tok.decode(ids) == "Caption:" + EN
    assert tok.decode(ids, skip_special=False).startswith("<bos><image><image>")


def test_prompt_is_the_prefix_of_the_example(tok):
    for prompt, caption in [("Caption:", EN), ("标题：", ZH), ("Describe:", " starts with a space")]:
        ids, _ = tok.build_example(prompt, caption, num_image_tokens=16)
        assert tok.build_prompt(prompt, 16) + tok.encode(caption) == ids[:-1]


def test_truncation_drops_eos_and_errors_without_room(tok):
    full, _ = tok.build_example("Caption:", EN, num_image_tokens=4)
    ids, labels = tok.build_example("Caption:", EN, num_image_tokens=4, max_len=len(full) - 3)
    assert len(ids) == len(full) - 3 and ids == full[: len(ids)]
    assert tok.eos_id not in ids and labels[-1] == ids[-1] != IGNORE_INDEX
    same, _ = tok.build_example("Caption:", EN, num_image_tokens=4, max_len=len(full))
    assert same == full
    prefix = len(tok.build_prompt("Caption:", 4))
    with pytest.raises(ValueError, match=f"max_len={prefix}.*prefix alone is {prefix} tokens"):
        tok.build_example("Caption:", EN, num_image_tokens=4, max_len=prefix)


def test_save_and_load(tok, tmp_path):
    tok.save(tmp_path / "ckpt")  # a directory: tokenizer.json inside
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    assert not (tmp_path / "ckpt" / "tokenizer_config.json").exists()  # our own names need no config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = Tokenizer.from_file(tmp_path / "ckpt" / "tokenizer.json")
    assert loaded.encode(EN + ZH) == tok.encode(EN + ZH)
    assert (loaded.bos_id, loaded.image_id, loaded.vocab_size) == (0, 3, tok.vocab_size)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Tokenizer.from_file(tmp_path / "missing.json")


def _foreign(tmp_path, config=None):
    """A tokenizer.json as a pretrained LM ships it: its own specials, `<pad>` a plain word, padding on."""
    foreign = tokenizers.Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<pad>": 2, "hello": 3, "world": 4,
                                                     "[UNK]": 5}, unk_token="[UNK]"))
    foreign.pre_tokenizer = pre_tokenizers.Whitespace()
    foreign.add_special_tokens(["<s>", "</s>"])
    foreign.enable_padding(length=8, pad_id=2, pad_token="<pad>")
    foreign.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path / "tokenizer.json"


def test_foreign_tokenizer_gets_missing_specials_with_a_warning(tmp_path):
    path = _foreign(tmp_path)
    with pytest.warns(UserWarning, match=r"added <bos>=6, <eos>=7, <image>=8"):
        tok = Tokenizer.from_file(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id) == (6, 7, 2, 8)
    assert tok.vocab_size == 9
    assert tok.encode("hello world") == [3, 4]  # padding switched off
    assert tok.decode([6, 3, 2, 4, 7]) == "hello world"  # an existing <pad> became special too


def test_foreign_roles_from_tokenizer_config(tmp_path):
    path = _foreign(tmp_path, {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "model_max_length": 8})
    with pytest.warns(UserWarning, match=r"added <image>=6"):
        tok = Tokenizer.from_file(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id) == (0, 1, 2, 6)
    out = tmp_path / "saved"
    tok.save(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<s>" and cfg["image_token"] == "<image>"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = Tokenizer.from_file(out)
    assert (again.bos_id, again.eos_id, again.image_id) == (0, 1, 6)
    with pytest.raises(ValueError, match="unknown special-token roles"):
        Tokenizer.from_file(path, special_tokens={"cls": "<s>"})


def test_stream_decoder_never_splits_a_character(tok):
    text = "龘鱻 一个大的红色圆形、" + EN + "。🙂"
    ids = tok.encode(text) + [tok.eos_id]
    # the unseen characters are single bytes here, three or four tokens each
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert "" in pieces[:3]  # 龘 is held back until its last byte
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["", "", "龘"]


def test_stream_decoder_flushes_an_unfinished_character(tok):
    ids = tok.encode("龘")
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.flush() == "\ufffd"


ANY_TEXT = settings(max_examples=200, deadline=None)


@ANY_TEXT
@given(st.text())
def test_any_text_round_trips_whole_and_streamed(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text


@ANY_TEXT
@given(st.lists(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(), min_size=1)
       .map("".join))  # not st.text: it leaves surrogates out
def test_text_with_lone_surrogates_is_a_value_error(tok, text):
    has_surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    try:
        ids = tok.encode(text)
    except ValueError as e:
        assert has_surrogate and "lone surrogate" in str(e)
        return
    assert not has_surrogate and tok.decode(ids) == text


@ANY_TEXT
@given(st.lists(st.integers(-(2**70), 2**70) | st.integers(0, 600), max_size=12))
def test_any_ids_decode_to_text(tok, ids):
    assert tok.decode(ids) == tok.decode([i for i in ids if 0 <= i < tok.vocab_size])
