"""Image changes a caption must survive: the ops, random augmentation built from them, and the
fixed changes that evaluation applies.

Real images are re-saved as JPEG, rescaled, cropped, shifted and noisy. Each op here is a pure
function of a PIL image and its parameters, so training (`Augment`, drawn per sample in the data
workers with a seeded `random.Random`) and evaluation (`CHANGES`, one fixed change per name) use
the same code. Every op keeps a scene's caption true: geometry only moves or rescales the whole
image (an object's place is relative to the scene's 3x3 grid, which moves with it), uncovered
area is filled with the image's border colour (a scene's background), and brightness/contrast
stay within +-10%, which keeps the six colours and three backgrounds apart.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from lm.config import ConfigBase, check_ranges
from vision.preprocess import border_colour

_FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS,
            Image.Resampling.BOX, Image.Resampling.NEAREST)


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """Save as JPEG at `quality` (4:2:0 chroma, as cameras and browsers do) and decode again."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def noise(img: Image.Image, sigma: float, rng: random.Random) -> Image.Image:
    """Add Gaussian noise of standard deviation `sigma` (in 0..255 units), then round and clip."""
    gen = np.random.default_rng(rng.getrandbits(64))
    arr = gen.standard_normal((img.height, img.width, 3), dtype=np.float32)
    arr *= sigma
    arr += np.asarray(img, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def shift(img: Image.Image, dx: int, dy: int) -> Image.Image:
    """Move the content by (dx, dy) px; what leaves the frame is cut, what it uncovers is border colour."""
    out = Image.new("RGB", img.size, border_colour(img))
    out.paste(img, (int(dx), int(dy)))
    return out


def rescale(img: Image.Image, longest: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """Resize so the longest side is `longest` px, keeping the aspect ratio."""
    scale = longest / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img if size == img.size else img.resize(size, resample)


def on_canvas(img: Image.Image, width: int, height: int, x: int, y: int) -> Image.Image:
    """Place the image at (x, y) on a width x height canvas of its border colour."""
    out = Image.new("RGB", (width, height), border_colour(img))
    out.paste(img, (int(x), int(y)))
    return out


def tone(img: Image.Image, brightness: float, contrast: float) -> Image.Image:
    return ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(brightness)).enhance(contrast)


def blur(img: Image.Image, radius: float) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius))


def canvas_size(w: int, h: int, aspect: float) -> tuple[int, int]:
    """The frame around a w x h image widened (aspect > 1) or heightened (< 1) to width/height = aspect."""
    return (max(w, round(h * aspect)), h) if aspect >= 1 else (w, max(h, round(w / aspect)))


def centred_canvas(img: Image.Image, aspect: float) -> Image.Image:
    width, height = canvas_size(*img.size, aspect)
    return on_canvas(img, width, height, (width - img.width) // 2, (height - img.height) // 2)


# The changes evaluation reports, each a function of a clean test image (DESIGN: real-world handling).
CHANGES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": lambda im: im,
    "jpeg75": lambda im: jpeg(im, 75),
    "jpeg40": lambda im: jpeg(im, 40),
    "down64": lambda im: rescale(im, 64),
    "up384": lambda im: rescale(im, 384),
    "up512": lambda im: rescale(im, 512),
    "noise8": lambda im: noise(im, 8.0, random.Random(0)),
    "shift6": lambda im: shift(im, 6, 6),
    "shift8": lambda im: shift(im, -8, 8),
    "canvas4:3": lambda im: centred_canvas(im, 4 / 3),
    "canvas3:4": lambda im: centred_canvas(im, 3 / 4),
}


@dataclass
class AugmentConfig(ConfigBase):
    """The `augment` section of a training config: real-world image changes drawn per sample; each keeps a scene's
    caption true. Off by default: user data already varies, and some changes (a shift, a canvas)
    could cut what a caption names in other images."""

    enabled: bool = False
    p: float = 0.8  # chance a sample is changed at all; the rest stay clean
    canvas: float = 0.3  # chance of a non-square canvas of the border colour, image placed at random
    canvas_aspect: float = 1.4  # the canvas' width/height ratio drawn log-uniformly in [1/this, this]
    shift: float = 0.4  # chance of a translation
    shift_frac: float = 0.08  # up to this fraction of the shorter side in x and in y
    tone: float = 0.3  # chance of a brightness and contrast change
    tone_range: float = 0.1  # factors in [1 - this, 1 + this]
    blur: float = 0.15
    blur_radius: list[float] = field(default_factory=lambda: [0.3, 1.2])  # Gaussian radius, px
    scale: float = 0.6  # chance of a rescale (random filter) before noise and JPEG
    scale_px: list[int] = field(default_factory=lambda: [56, 512])  # longest side, log-uniform
    noise: float = 0.35
    noise_sigma: list[float] = field(default_factory=lambda: [1.0, 11.0])  # Gaussian, 0..255 units
    jpeg: float = 0.5
    jpeg_quality: list[int] = field(default_factory=lambda: [25, 95])

    def __post_init__(self):
        chances = {k: getattr(self, k) for k in ("p", "canvas", "shift", "tone", "blur", "scale", "noise", "jpeg")}

        def span(v, lo):
            return len(v) == 2 and lo <= v[0] <= v[1]

        check_ranges("TrainConfig.augment", [
            (all(0 <= v <= 1 for v in chances.values()), "chances must be in [0, 1]", chances),
            (self.canvas_aspect >= 1, "canvas_aspect must be >= 1", self.canvas_aspect),
            (0 <= self.shift_frac <= 0.5, "shift_frac must be in [0, 0.5]", self.shift_frac),
            (0 <= self.tone_range < 1, "tone_range must be in [0, 1)", self.tone_range),
            (span(self.blur_radius, 0), "blur_radius must be [low, high] with 0 <= low <= high", self.blur_radius),
            (span(self.scale_px, 8), "scale_px must be [low, high] with 8 <= low <= high", self.scale_px),
            (span(self.noise_sigma, 0), "noise_sigma must be [low, high] with 0 <= low <= high", self.noise_sigma),
            (span(self.jpeg_quality, 1) and self.jpeg_quality[1] <= 100,
             "jpeg_quality must be [low, high] within 1..100", self.jpeg_quality),
        ])


class Augment:
    """Random real-world changes, each applied with its probability (AugmentConfig above).

    Order: geometry at the source size (non-square canvas, shift), tone and blur, a rescale to
    the size the image is "saved" at, sensor noise, then JPEG, the way a photo or screenshot is
    made. `geometric=False` keeps only the pixel-level changes (the vision warm-up's per-cell
    labels need the grid where it is). Picklable, so it runs in data-loader workers.
    """

    def __init__(self, cfg, geometric: bool = True):
        self.cfg, self.geometric = cfg, geometric

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        c = self.cfg
        if rng.random() >= c.p:
            return img
        if self.geometric and rng.random() < c.canvas:
            aspect = math.exp(rng.uniform(-math.log(c.canvas_aspect), math.log(c.canvas_aspect)))
            width, height = canvas_size(*img.size, aspect)
            img = on_canvas(img, width, height, rng.randint(0, width - img.width), rng.randint(0, height - img.height))
        if self.geometric and rng.random() < c.shift:
            most = round(c.shift_frac * min(img.size))
            img = shift(img, rng.randint(-most, most), rng.randint(-most, most))
        if rng.random() < c.tone:
            img = tone(img, rng.uniform(1 - c.tone_range, 1 + c.tone_range),
                       rng.uniform(1 - c.tone_range, 1 + c.tone_range))
        if rng.random() < c.blur:
            img = blur(img, rng.uniform(*c.blur_radius))
        if rng.random() < c.scale:
            lo, hi = c.scale_px
            img = rescale(img, round(math.exp(rng.uniform(math.log(lo), math.log(hi)))), rng.choice(_FILTERS))
        if rng.random() < c.noise:
            img = noise(img, rng.uniform(*c.noise_sigma), rng)
        if rng.random() < c.jpeg:
            img = jpeg(img, rng.randint(*c.jpeg_quality))
        return img
