"""Write the app's example images and `index.json` into this folder.

    python examples/make_examples.py

Four synthetic scenes from the test split (rendered by `train.data.scenes`, so the
default model must caption them exactly; their four texts are stored beside
them) and two photo-like pictures. There is no network here for real photos, so
the "photos" are procedural: smooth gradients, blurred shapes and sensor-like
noise, which give the encoder the soft edges and textures of a photograph
rather than the flat colours it was trained on. Their labels say so. Everything
is seeded, so rerunning rewrites identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from train.data.scenes import render, sample_rng, sample_scene, texts

HERE = Path(__file__).resolve().parent
SCENES = ((0, "caption"), (1, "describe"), (2, "caption_zh"), (3, "describe_zh"))  # test-split index, task


def _noise(img: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, sigma, (img.height, img.width, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _vertical_gradient(size, top, bottom) -> Image.Image:
    w, h = size
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    arr = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)
    return Image.fromarray(np.repeat(arr, w, axis=1).astype(np.uint8))


def sunset(rng: np.random.Generator, size=(256, 192)) -> Image.Image:
    """An orange-to-violet sky, a soft sun and three layers of hills."""
    w, h = size
    img = _vertical_gradient(size, (250, 150, 60), (90, 50, 120))
    glow = Image.new("L", size, 0)
    ImageDraw.Draw(glow).ellipse((w * 0.55, h * 0.25, w * 0.75, h * 0.25 + w * 0.2), fill=255)
    img = Image.composite(Image.new("RGB", size, (255, 230, 150)), img, glow.filter(ImageFilter.GaussianBlur(6)))
    for k, colour in enumerate(((70, 45, 80), (45, 35, 60), (25, 20, 35))):
        x = np.arange(w)
        ridge = h * (0.55 + 0.12 * k) + 10 * np.sin(x / (25 + 10 * k) + rng.uniform(0, 6)) + rng.normal(0, 1.5, w)
        hill = Image.new("L", size, 0)
        ImageDraw.Draw(hill).polygon([(0, h), *zip(x.tolist(), ridge.tolist()), (w, h)], fill=255)
        img = Image.composite(Image.new("RGB", size, colour), img, hill.filter(ImageFilter.GaussianBlur(1.2)))
    return _noise(img, rng, 4.0)


def fruit_bowl(rng: np.random.Generator, size=(256, 192)) -> Image.Image:
    """Round fruit in a bowl on a grained wooden table, with a soft shadow."""
    w, h = size
    grain = np.sin(np.arange(h)[:, None] / 3.0 + rng.normal(0, 0.4, (h, w)).cumsum(1) * 0.05)
    wood = np.stack([150 + 25 * grain, 100 + 18 * grain, 60 + 10 * grain], -1)
    img = Image.fromarray(np.clip(wood, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
    shadow = Image.new("L", size, 0)
    ImageDraw.Draw(shadow).ellipse((w * 0.18, h * 0.62, w * 0.86, h * 0.92), fill=140)
    img = Image.composite(Image.new("RGB", size, (40, 25, 15)), img, shadow.filter(ImageFilter.GaussianBlur(8)))
    draw = ImageDraw.Draw(img)
    draw.chord((w * 0.2, h * 0.35, w * 0.8, h * 0.85), 0, 180, fill=(225, 225, 215))
    fruit = Image.new("RGB", size)
    mask = Image.new("L", size, 0)
    for (cx, cy, r), colour in zip(((0.38, 0.5, 0.12), (0.55, 0.45, 0.13), (0.47, 0.36, 0.1), (0.66, 0.55, 0.1)),
                                   ((235, 120, 20), (200, 30, 40), (120, 170, 40), (240, 190, 30))):
        box = (w * (cx - r), h * cy - w * r, w * (cx + r), h * cy + w * r)
        ImageDraw.Draw(fruit).ellipse(box, fill=colour)
        ImageDraw.Draw(mask).ellipse(box, fill=255)
    img = Image.composite(fruit.filter(ImageFilter.GaussianBlur(1.5)), img, mask.filter(ImageFilter.GaussianBlur(1.5)))
    return _noise(img, rng, 5.0)


def main() -> None:
    index = []
    for i, task in SCENES:
        scene = sample_scene(sample_rng("test", 0, i))
        name = f"scene_{i}.png"
        render(scene).save(HERE / name)
        index.append({"file": name, "task": task, "label": f"synthetic scene {i} ({task})",
                      "texts": texts(scene)})
    rng = np.random.default_rng(0)
    for name, make, label in (("sunset.jpg", sunset, "photo-like (procedural, not a real photo): sunset"),
                              ("fruit_bowl.jpg", fruit_bowl, "photo-like (procedural, not a real photo): fruit bowl")):
        make(rng).save(HERE / name, quality=88)
        index.append({"file": name, "task": "describe", "label": label})
    (HERE / "index.json").write_text(json.dumps(index, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(index)} examples and index.json to {HERE}")


if __name__ == "__main__":
    main()
