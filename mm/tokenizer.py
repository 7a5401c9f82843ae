"""Byte-level BPE tokenizer and the captioner's sequence layout.

A thin layer over a `tokenizers.Tokenizer`: either one trained here on the
captions (ByteLevel pre-tokenizer and decoder, all 256 bytes in the initial
alphabet so any text encodes, and no prefix space, so `decode(encode(s)) == s`
exactly for English and Chinese), or any `tokenizer.json` that comes with a
pretrained LM.

Four roles have fixed special tokens: `<bos> <eos> <pad> <image>`, ids 0..3 in
a tokenizer trained here. A foreign tokenizer keeps its own tokens for the roles
that `tokenizer_config.json` beside it names (`bos_token`, `eos_token`,
`pad_token`, `image_token`); roles it lacks get new special tokens, with a warning.
Special tokens are never produced from text: a caption containing the literal
string "<image>" encodes as ordinary bytes.

Sequence layout (DESIGN.md): `<bos> <image>*N prompt caption <eos>`. Prompt and
caption are tokenised separately and concatenated, with nothing in between, so
`build_prompt(p, N) + encode(caption)` is exactly the training input and
generation after the prompt reproduces training.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from lm.hf import atomic_file
from lm.loss import IGNORE_INDEX

DEFAULT_SPECIALS = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "image": "<image>"}
_CONFIG_NAME = "tokenizer_config.json"


def _write_atomic(path: Path, text: str) -> None:
    atomic_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _roles_from_config(directory: Path) -> dict[str, str]:
    """Role -> token text from an HF-style tokenizer_config.json, if one is there."""
    path = directory / _CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # ValueError: bad JSON or not UTF-8
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(cfg).__name__}")
    roles = {}
    for role in DEFAULT_SPECIALS:
        value = cfg.get(f"{role}_token")
        if isinstance(value, dict):  # HF serialises AddedToken as a dict
            value = value.get("content")
        if isinstance(value, str) and value:
            roles[role] = value
    return roles


def _surrogate_at(text) -> int | None:
    """Index of the first lone surrogate (a str that has no UTF-8 form), if any."""
    if not isinstance(text, str):
        return None
    return next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None)


class Tokenizer:
    """Text <-> ids, plus the special-token ids and the captioner's sequence layout."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, special_tokens: dict[str, str] | None = None):
        unknown = set(special_tokens or {}) - set(DEFAULT_SPECIALS)
        if unknown:
            raise ValueError(f"unknown special-token roles {sorted(unknown)}; roles are {list(DEFAULT_SPECIALS)}")
        self.special_tokens = {**DEFAULT_SPECIALS, **(special_tokens or {})}
        # a pretrained tokenizer.json may pad or truncate every encoding; we lay sequences out ourselves
        tokenizer.no_padding()
        tokenizer.no_truncation()
        missing = [t for t in self.special_tokens.values() if tokenizer.token_to_id(t) is None]
        # marks existing tokens special (same ids) so decode can skip them, and adds the missing ones
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                      for t in self.special_tokens.values()])
        tokenizer.encode_special_tokens = True  # text never turns into control tokens
        self._tok = tokenizer
        ids = {role: tokenizer.token_to_id(t) for role, t in self.special_tokens.items()}
        self.bos_id, self.eos_id, self.pad_id, self.image_id = ids["bos"], ids["eos"], ids["pad"], ids["image"]
        if missing:
            added = ", ".join(f"{t}={tokenizer.token_to_id(t)}" for t in missing)
            warnings.warn(f"tokenizer lacked special tokens; added {added} (their embeddings start untrained)",
                          stacklevel=3)

    # --- construction and files ------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE; the special tokens take ids 0..3 (bos, eos, pad, image)."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        floor = len(alphabet) + len(DEFAULT_SPECIALS)
        if vocab_size < floor:
            raise ValueError(f"vocab_size={vocab_size} is below the {floor} tokens of 256 bytes + 4 specials")
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # a prefix space breaks round trips
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            special_tokens=list(DEFAULT_SPECIALS.values()), initial_alphabet=alphabet,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path, special_tokens: dict[str, str] | None = None) -> Tokenizer:
        """Load a tokenizer.json; role names come from `special_tokens`, else tokenizer_config.json beside it."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception for malformed files
            raise ValueError(f"{path}: not a tokenizers tokenizer.json ({e})") from e
        roles = {**_roles_from_config(path.parent), **(special_tokens or {})}
        return cls(tok, roles)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json (atomically) at `path`, or inside it if it is a directory; role names that are not ours go to tokenizer_config.json."""
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":  # a (maybe new) checkpoint directory
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, self._tok.to_str())
        config_path = path.parent / _CONFIG_NAME
        if self.special_tokens != DEFAULT_SPECIALS or config_path.is_file():
            cfg = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
            cfg.update({f"{role}_token": t for role, t in self.special_tokens.items()})
            _write_atomic(config_path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    # --- text <-> ids ---------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:
            bad = _surrogate_at(text)
            if bad is not None:  # the Rust side takes UTF-8 only: a lone surrogate cannot be encoded
                raise ValueError(f"text has a lone surrogate {text[bad]!r} at index {bad}; it is not "
                                 "valid Unicode, so it has no UTF-8 bytes to encode") from None
            raise

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; an id outside the vocabulary (a model's padding rows) has no text."""
        n = self.vocab_size
        return self._tok.decode([i for i in map(int, ids) if 0 <= i < n], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    # --- sequence layout ------------------------------------------------------------

    def build_prompt(self, prompt: str, num_image_tokens: int) -> list[int]:
        """The generation prefix `<bos> <image>*N prompt`."""
        if num_image_tokens < 0:
            raise ValueError(f"num_image_tokens must be >= 0, got {num_image_tokens}")
        return [self.bos_id] + [self.image_id] * num_image_tokens + self.encode(prompt)

    def build_example(
        self, prompt: str, caption: str, num_image_tokens: int, max_len: int | None = None
    ) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for `<bos> <image>*N prompt caption <eos>`.

        Labels sit at the input positions (the model shifts them): IGNORE_INDEX on
        bos, image and prompt tokens; the caption ids and eos elsewhere. When the
        whole sequence exceeds `max_len` the caption is cut and gets no eos, so the
        model never learns to stop mid-sentence.
        """
        prefix = self.build_prompt(prompt, num_image_tokens)
        target = self.encode(caption) + [self.eos_id]
        if max_len is not None and len(prefix) + len(target) > max_len:
            room = max_len - len(prefix)
            if room < 1:
                raise ValueError(
                    f"max_len={max_len} leaves no room for the caption: the prefix alone is {len(prefix)} "
                    f"tokens (1 bos + {num_image_tokens} image + {len(prefix) - 1 - num_image_tokens} prompt)"
                )
            target = target[:room]
        return prefix + target, [IGNORE_INDEX] * len(prefix) + target


class StreamDecoder:
    """Turns ids arriving one at a time into text, never emitting part of a character.

    Byte-level BPE may split a Chinese character's three bytes across tokens;
    until the last byte arrives the decoded tail is U+FFFD and is held back.
    Decoding a short window of tokens (not only the new one) keeps decoders that
    depend on neighbours (leading-space rules) exact.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._prefix = 0  # start of the window that is decoded again for context
        self._read = 0  # ids before this are emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still open)."""
        self.ids.append(int(token_id))
        done = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an unfinished character decodes as U+FFFD)."""
        done = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(done):]
