"""Vision side of the captioner: a timm encoder wrapper and image loading/preprocessing."""

from vision.encoder import VisionEncoder
from vision.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageTransform,
    build_transform,
    load_image,
    to_rgb,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "ImageTransform",
    "VisionEncoder",
    "build_transform",
    "load_image",
    "to_rgb",
]
