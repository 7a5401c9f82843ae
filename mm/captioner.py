"""`Captioner`: the user-facing API. Images in (PIL, paths or bytes), text out.

    cap = Captioner.from_pretrained()          # the bundled default model
    cap.caption(image)                         # -> str
    cap.caption([a, b], task="describe")       # -> list[str]
    for piece in cap.stream(image): ...        # text as it is generated
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image

import lm
from mm.checkpoint import load_checkpoint, save_checkpoint
from mm.draft_policy import DraftPolicy
from mm.generate import GenerationConfig, GenerationStats, generate, stream_tokens
from vision.preprocess import build_transform, load_image

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
_GEN_OPTIONS = {f.name for f in fields(GenerationConfig)}


@dataclass
class CaptionResult:
    texts: list[str]
    stats: GenerationStats
    confidence: list[float] = field(default_factory=list)  # per image, in [0, 1] (mm/confidence.py)
    unfamiliar: list[bool] = field(default_factory=list)  # per image: confidence below the task's threshold


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


class Captioner:
    def __init__(self, model, tokenizer, device="cpu", batch_size: int = 16, compile: bool = False):
        self.model = model.eval()
        # NHWC convolutions: a single image at 96 px otherwise takes PyTorch's slow
        # NCHW path on the CPU (small inputs skip oneDNN); checkpoints save either layout.
        self.model.vision.to_channels_last()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.transform = build_transform(model.vision.data_config)
        self.path: Path | None = None
        self.decoder = lm.Decoder(model.lm)  # the fast decode path over this model's weights
        # how deep MTP speculation drafts here, per task (mm/draft_policy.py); None: the trained depth, always
        self.draft_policy: DraftPolicy | None = DraftPolicy()
        self.compile_s: float | None = None
        if compile:
            self.compile()

    @classmethod
    def from_pretrained(cls, path=None, device=None, dtype=None, batch_size: int = 16,
                        compile: bool = False) -> Captioner:
        """Load a checkpoint directory; None loads the bundled default model. compile=True
        compiles the decode step (see `compile`)."""
        path = Path(path) if path is not None else DEFAULT_MODEL_DIR
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_checkpoint(path, device=device, dtype=_dtype(dtype))
        cap = cls(model, tokenizer, device=device, batch_size=batch_size, compile=compile)
        cap.path = path
        return cap

    def compile(self, mode: str | None = None) -> float:
        """Compile the decode step with torch.compile (CUDA graphs on a GPU) and warm it up on
        one blank image per task; returns and prints the seconds that took. Each new batch
        size compiles once more when first used; greedy, sampling and beams share the graphs."""
        if mode is None and self.device.type == "cuda":
            mode = "reduce-overhead"
        t0 = time.perf_counter()
        self.decoder.compile(mode)
        blank = Image.new("RGB", (self.model.cfg.vision.image_size,) * 2)
        for task in self.tasks:
            self.caption(blank, task=task, max_new_tokens=4, speculative=False)
        if self.draft_policy is not None:  # compiled steps cost differently (and these runs include compiling)
            self.draft_policy = DraftPolicy()
        self.compile_s = time.perf_counter() - t0
        print(f"compiled the decode step in {self.compile_s:.1f} s", file=sys.stderr)
        return self.compile_s

    @property
    def tasks(self) -> list[str]:
        return list(self.model.cfg.tasks)

    def save_pretrained(self, path) -> Path:
        return save_checkpoint(path, self.model, self.tokenizer)

    def generation_config(self, **options) -> GenerationConfig:
        """The checked GenerationConfig of these options; raises TypeError for an unknown option
        and lm.ConfigError (a ValueError) naming each bad value."""
        unknown = sorted(set(options) - _GEN_OPTIONS)
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}; valid: {sorted(_GEN_OPTIONS)}")
        return GenerationConfig(**options).validate()

    def prefix(self, task: str, n: int = 1) -> torch.Tensor:
        """The prompt ids [n, L] of `task` (<bos>, the image slots, the task's prompt)."""
        prompt = self.model.cfg.prompt(task)  # raises on an unknown task, naming the known ones
        ids = self.tokenizer.build_prompt(prompt, self.model.num_image_tokens)
        return torch.tensor([ids] * n, device=self.device)

    def pixels(self, images) -> torch.Tensor:
        """The encoder's input batch [B, 3, S, S] for a list of images, on the model's device and dtype."""
        param = next(self.model.parameters())
        # A tensor is taken as already through `self.transform` (bulk captioning decodes elsewhere).
        batch = torch.stack([im if isinstance(im, torch.Tensor) else self.transform(load_image(im)) for im in images])
        return batch.to(device=self.device, dtype=param.dtype)

    def run(self, images, task: str = "caption", **options) -> CaptionResult:
        """Caption a list of images (PIL, paths, bytes, or [3, S, S] tensors from `self.transform`);
        texts plus timing, speculation and expert-load stats."""
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        if not images:
            raise ValueError("no images given: pass an image or a non-empty list of images")
        gen = self.generation_config(**options)
        self.model.cfg.prompt(task)  # an unknown task fails before any image is read
        texts, total = [], GenerationStats()
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            ids, stats = generate(self.model, self.pixels(chunk), self.prefix(task, len(chunk)), gen,
                                  self.tokenizer.eos_id, self.decoder, self.draft_policy)
            texts += [self.tokenizer.decode(row).strip() for row in ids]
            total.add(stats)
        return CaptionResult(texts, total, total.confidence, [self.unfamiliar(c, task) for c in total.confidence])

    def threshold(self, task: str = "caption") -> float | None:
        """The calibrated confidence below which an image is reported as unlike the training data;
        None for a model without a calibration (`mm calibrate`)."""
        cal = self.model.calibration
        return None if cal is None else cal.threshold(task)

    def unfamiliar(self, confidence: float, task: str = "caption") -> bool:
        threshold = self.threshold(task)
        return threshold is not None and confidence < threshold

    def caption(self, images, task: str = "caption", **options):
        """A caption (str) for one image, or a list of captions for a list of images."""
        texts = self.run(images, task, **options).texts
        return texts if isinstance(images, (list, tuple)) else texts[0]

    def stream(self, image, task: str = "caption", stats: GenerationStats | None = None,
               **options) -> Iterator[str]:
        """Yield the caption's text as it is generated, whole characters only."""
        gen = self.generation_config(**options)
        if gen.num_beams > 1:
            raise ValueError("beam search cannot stream: use num_beams=1, or caption() for beams")
        stats = stats if stats is not None else GenerationStats()
        text = CaptionText(self.tokenizer)
        # Inference mode is entered per step, not across the yields: a server may resume
        # this generator on another thread, where a mode entered earlier does not hold.
        with torch.inference_mode():
            pixels, prefix = self.pixels([image]), self.prefix(task, 1)
            steps = stream_tokens(self.model, pixels, prefix, gen, self.tokenizer.eos_id, stats, self.decoder,
                                  self.draft_policy)
        while True:
            with torch.inference_mode():
                step = next(steps, None)
            if step is None:
                break
            for tok in step[0]:
                if piece := text.push(tok):
                    yield piece
        if tail := text.flush():
            yield tail


class CaptionText:
    """Token ids -> the caption's text in pieces of whole characters, without its leading space.
    The pieces join to what `Captioner.run` returns, except for a character that
    max_new_tokens cut in half, which comes out at `flush`."""

    def __init__(self, tokenizer):
        self.decoder = tokenizer.stream_decoder()
        self.started = False

    def push(self, token: int) -> str:
        piece = self.decoder.push(token)
        if not self.started:  # the caption's leading space is not part of the text
            piece = piece.lstrip()
            self.started = bool(piece)
        return piece

    def flush(self) -> str:
        tail = self.decoder.flush()  # bytes of a character cut off by max_new_tokens
        if tail and (self.started or tail.strip()):
            return tail if self.started else tail.lstrip()
        return ""
