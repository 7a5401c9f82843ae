"""Image loading and the deterministic pixel transform that feeds the vision encoder.

`load_image` turns whatever a user or a shard hands us (a PIL image, a path,
raw bytes, a binary file object) into an upright 8-bit RGB image, or raises
`ImageError` naming the source and the reason. Transparent images are composited
on white, 16-bit and float images are scaled to 8 bits (not clipped), EXIF
orientation is applied, and the pixel count is capped before decoding so a
decompression bomb is refused from its header alone. Only the formats in
`IMAGE_FORMATS` are decoded, recognised by content (never by a file name or a
declared media type): PIL's other plugins include EPS, which runs Ghostscript on
the file's PostScript, and no byte a user sends may reach an interpreter.

`build_transform` fits the image into image_size x image_size keeping its aspect
ratio: the longest side is resized to image_size and the shorter one is padded
on both sides (centred) with the image's border colour, the median of its
outermost pixel ring. Nothing is cropped, squashed or flipped (captions name
positions, and a 4:3 photo of a scene is still the same scene); a square image
is only resized. Then it normalises with timm's mean/std. Training and inference
share this transform. It runs in data-loader workers for every sample, so it is
a picklable object doing one PIL resize, one paste and one fused uint8 -> float
multiply-add.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 64_000_000
# The formats we decode, as PIL names them; everything else (EPS, PDF, PSD, ICNS, ...) is refused
# before a plugin parses it. PPM covers the PBM/PGM/PPM family of webdataset's image members.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
_EXIF_ORIENTATION = 0x0112
_BAND_PIXELS = 1 << 20  # pixels converted at once when a 16-bit or float image is scaled to 8 bits

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class ImageError(ValueError):
    """An image that cannot be used: unreadable, empty, too large, or missing."""


def _describe(x: Any) -> str:
    if isinstance(x, (str, Path)):
        return str(x)
    if isinstance(x, (bytes, bytearray, memoryview)):
        return f"bytes of length {len(x)}"
    if isinstance(x, Image.Image):
        return f"PIL image {x.mode} {x.size[0]}x{x.size[1]}"
    return getattr(x, "name", None) or type(x).__name__


def open_image_bytes(data: bytes) -> Image.Image:
    """A lazily decoded PIL image of one of IMAGE_FORMATS; PIL's UnidentifiedImageError otherwise."""
    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)


def _open(x: Any, source: str) -> Image.Image:
    if isinstance(x, (str, Path)):
        path = Path(x).expanduser()
        if not path.is_file():
            raise ImageError(f"{source}: {'a directory, not an image file' if path.is_dir() else 'no such file'}")
        return open_image_bytes(path.read_bytes())  # no file handle left open (multi-frame files)
    if isinstance(x, (bytes, bytearray, memoryview)):
        if len(x) == 0:
            raise ImageError(f"{source}: empty")
        return open_image_bytes(bytes(x))
    if hasattr(x, "read"):
        return Image.open(x, formats=IMAGE_FORMATS)
    raise ImageError(f"cannot load an image from {type(x).__name__}; give a PIL image, a path or bytes")


def _scale_to_uint8(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer images to 8 bits by range (65535 -> 255); float images from [0, 1].

    Converted a band of rows at a time: the extra memory is a few megabytes whatever the image's
    size (a whole-image float64 copy costs 8 bytes a pixel, gigabytes under the pixel cap)."""
    width, height = img.size
    rows = max(1, _BAND_PIXELS // max(width, 1))
    scale = 1.0
    if img.mode == "F":
        top = img.getextrema()[1]  # [0, 1] floats, else already 0..255
        scale = 255.0 if top != top or top <= 1.0 else 1.0  # NaN extrema: the NaNs become 0 below
    out = np.empty((height, width), dtype=np.uint8)
    for y in range(0, height, rows):
        band = np.asarray(img.crop((0, y, width, min(height, y + rows))))
        if img.mode == "F":
            band = np.clip(np.nan_to_num(band.astype(np.float32), nan=0.0) * scale, 0, 255)
            out[y : y + rows] = np.rint(band)
        else:  # I, I;16, I;16B, ...: 257 = 65535 / 255 maps the ends exactly; (x + 128) // 257 = rint(x / 257)
            out[y : y + rows] = (np.clip(band.astype(np.int64), 0, 65535) + 128) // 257
    return Image.fromarray(out)  # 2-D uint8 -> mode L


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited on a white background."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode == "F" or img.mode.startswith("I"):
        img = _scale_to_uint8(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(x: Any, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """A PIL image, path (str/Path), bytes or binary file -> upright RGB PIL image.

    Images over `max_pixels` are refused before they are decoded. PIL's own bomb
    guard (Image.MAX_IMAGE_PIXELS) still applies above our cap. `draft_size` lets a
    JPEG decode at 1/2..1/8 scale in the DCT while both sides stay >= draft_size (PIL's
    `Image.draft`): an encoder that sees 96 px never needs a 1024 px decode, which costs
    ~12x more. The pixels then differ slightly from a full decode, so it is opt-in.
    """
    source = _describe(x)
    try:
        with warnings.catch_warnings():
            # we enforce our own cap below; PIL's warning for images between its limit and ours is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = x if isinstance(x, Image.Image) else _open(x, source)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{source}: refused as a decompression bomb by PIL ({e})") from e
    except Image.UnidentifiedImageError:  # its message repeats the path; say what we accept instead
        raise ImageError(f"{source}: not a readable image in a supported format "
                         f"({', '.join(IMAGE_FORMATS)})") from None
    except Exception as e:  # PIL's plugins raise OSError, SyntaxError, ValueError, struct.error, ... on bad bytes
        raise ImageError(f"{source}: not a readable image ({type(e).__name__}: {e})") from e
    width, height = img.size
    if width == 0 or height == 0:
        raise ImageError(f"{source}: zero-size image ({width}x{height})")
    if max_pixels and width * height > max_pixels:
        raise ImageError(
            f"{source}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
            f"(possible decompression bomb; raise max_pixels if the image is genuine)"
        )
    try:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # skip exif_transpose's copy when upright
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Exception as e:
        raise ImageError(f"{source}: cannot decode ({type(e).__name__}: {e})") from e


def border_colour(img: Image.Image) -> tuple[int, int, int]:
    """The median RGB of the image's outermost ring of pixels: a scene's background colour."""
    arr = np.asarray(img.convert("RGB"))
    ring = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])  # [perimeter, 3]
    return tuple(int(v) for v in np.median(ring, axis=0))


class ImageTransform:
    """PIL image -> normalised float tensor [3, size, size], aspect kept by border-colour padding;
    picklable for data-loader workers."""

    def __init__(self, image_size: int, mean, std, interpolation: str = "bicubic"):
        if interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {sorted(_RESAMPLE)}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
        self.image_size = int(image_size)
        self.interpolation = interpolation
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # (x / 255 - mean) / std folded into one multiply-add on the uint8 pixels
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std])
        self._shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.to_tensor(self.fit(img))

    def fit(self, img: Image.Image) -> np.ndarray:
        """The PIL half: [size, size, 3] uint8 pixels, resized and padded. It is most of the cost and
        needs no torch, so bulk captioning runs it in worker processes and ships the small array."""
        img = to_rgb(img)
        n = self.image_size
        if img.size != (n, n):
            scale = n / max(img.size)
            fitted = (min(n, max(1, round(img.width * scale))), min(n, max(1, round(img.height * scale))))
            resized = img.resize(fitted, _RESAMPLE[self.interpolation])
            if fitted != (n, n):
                square = Image.new("RGB", (n, n), border_colour(img))
                square.paste(resized, ((n - fitted[0]) // 2, (n - fitted[1]) // 2))
                resized = square
            img = resized
        return np.array(img, dtype=np.uint8)  # [H, W, 3], a writable copy

    def to_tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """[size, size, 3] uint8 from `fit` -> the normalised float tensor [3, size, size]."""
        out = torch.addcmul(self._shift, torch.from_numpy(pixels), self._scale)  # [H, W, 3] float32
        return out.permute(2, 0, 1).contiguous()  # [3, H, W]

    def __repr__(self) -> str:
        return (f"ImageTransform(image_size={self.image_size}, mean={self.mean}, std={self.std}, "
                f"interpolation={self.interpolation!r})")


def build_transform(
    data_config: dict | None = None,
    *,
    image_size: int | None = None,
    mean=None,
    std=None,
    interpolation: str | None = None,
) -> ImageTransform:
    """From timm's data config (`VisionEncoder.data_config`), or from explicit values.

    Explicit keyword values override the data config's.
    """
    cfg = dict(data_config or {})
    if image_size is None:
        if "input_size" not in cfg:
            raise ValueError("build_transform needs a data_config with 'input_size' or image_size=")
        image_size = cfg["input_size"][-1]
    mean = mean if mean is not None else cfg.get("mean")
    std = std if std is not None else cfg.get("std")
    if mean is None or std is None:
        raise ValueError("build_transform needs mean and std (from the data_config or given)")
    interpolation = interpolation or cfg.get("interpolation") or "bicubic"
    return ImageTransform(image_size, mean, std, interpolation)
