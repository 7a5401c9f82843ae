"""The synthetic scene grammar: sample a scene, render it, write its four texts, parse them back.

Everything here is a pure function of its arguments, so the shard writer, the
evaluator and the tests share one definition of the data set (DESIGN.md, "The
synthetic scenes"). Two things a reader must know:

- Geometry is integer. A 3x3 grid of 128/3 px cells; an object's centre is an
  integer pixel within 4 px (in x and in y) of its cell's exact centre, and its
  box covers the pixels ``[x - side // 2, x - side // 2 + side)`` in each axis.
  With sides <= 34 px the worst case still leaves a gap of one pixel between
  neighbouring cells and one pixel to the canvas edge, so objects never overlap.
- Determinism: every sample has its own ``random.Random`` seeded from (split,
  seed, index), so a shard's contents do not depend on how many processes wrote
  the data set, and the three splits draw from disjoint seed spaces.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from PIL import Image, ImageDraw

from mm.config import TASKS  # the texts a scene has: every task of the default model

CANVAS = 128
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": (12, 18), "large": (28, 34)}  # box side in px, both ends included
PLACES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
PLACE_PHRASES = dict(zip(PLACES, (
    "at the top left", "at the top", "at the top right", "on the left", "in the center",
    "on the right", "at the bottom left", "at the bottom", "at the bottom right",
)))
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
COUNT_TASKS = ("count", "count_zh")  # not in the default model: a task for fine-tuning to teach
SPLITS = ("train", "val", "test")

BACKGROUNDS_ZH = {"white": "白色", "black": "黑色", "gray": "灰色"}
COLOURS_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"}
SHAPES_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "diamond": "菱形"}
SIZES_ZH = {"large": "大的", "small": "小的"}
PLACES_ZH = dict(zip(PLACES, ("左上方", "上方", "右上方", "左侧", "中间", "右侧", "左下方", "下方", "右下方")))
COUNT_WORDS_ZH = {1: "一个", 2: "两个", 3: "三个"}


def _centre_range(i: int) -> tuple[int, int]:
    """Integer centres within 4 px of the exact centre (2i+1)*64/3 of grid column/row i."""
    exact = Fraction((2 * i + 1) * CANVAS, 6)
    return math.ceil(exact - 4), math.floor(exact + 4)


_CENTRE_RANGES = tuple(_centre_range(i) for i in range(3))


@dataclass
class SceneObject:
    cell: int  # 0..8, reading order: row = cell // 3, column = cell % 3
    shape: str
    colour: str
    size: str  # "small" | "large"
    side: int  # box side in px
    x: int  # centre, px
    y: int

    @property
    def place(self) -> str:
        return PLACES[self.cell]

    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), both corners inside the box (PIL's inclusive convention)."""
        x0, y0 = self.x - self.side // 2, self.y - self.side // 2
        return x0, y0, x0 + self.side - 1, y0 + self.side - 1


@dataclass
class Scene:
    background: str
    objects: list[SceneObject] = field(default_factory=list)  # sorted by cell

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        try:
            return cls(d["background"], [SceneObject(**o) for o in d["objects"]])
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a scene dict (need 'background' and 'objects' with {list(SceneObject.__annotations__)}): {e}") from e


def split_seed(split: str, seed: int) -> int:
    """Fold the split into the seed: seed*3 + split index, so no two (split, seed) pairs collide."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return seed * len(SPLITS) + SPLITS.index(split)


def sample_rng(split: str, seed: int, index: int) -> random.Random:
    """The generator for sample `index` of a split; disjoint across (split, seed) for index < 2**32."""
    if not 0 <= index < 2**32:
        raise ValueError(f"sample index must be in [0, 2**32), got {index}")
    return random.Random(split_seed(split, seed) * 2**32 + index)


def sample_scene(rng: random.Random) -> Scene:
    background = rng.choice(tuple(BACKGROUNDS))
    count = rng.randint(1, 3)
    objects = []
    for cell in sorted(rng.sample(range(9), count)):
        size = rng.choice(tuple(SIZES))
        objects.append(SceneObject(
            cell=cell,
            shape=rng.choice(SHAPES),
            colour=rng.choice(tuple(COLOURS)),
            size=size,
            side=rng.randint(*SIZES[size]),
            x=rng.randint(*_CENTRE_RANGES[cell % 3]),
            y=rng.randint(*_CENTRE_RANGES[cell // 3]),
        ))
    return Scene(background, objects)


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (CANVAS, CANVAS), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x0, y0, x1, y1 = o.box()
        xm, ym = (x0 + x1) / 2, (y0 + y1) / 2  # half-pixel when the side is even; PIL rounds
        fill = COLOURS[o.colour]
        if o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(xm, y0), (x1, y1), (x0, y1)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}; expected one of {SHAPES}")
    return img


def _join(parts: list[str], sep: str, last: str) -> str:
    return parts[0] if len(parts) == 1 else sep.join(parts[:-1]) + last + parts[-1]


def texts(scene: Scene) -> dict[str, str]:
    objs, n = scene.objects, len(scene.objects)
    phrases = [f"a {o.size} {o.colour} {o.shape}" for o in objs]
    phrases_zh = [f"一个{SIZES_ZH[o.size]}{COLOURS_ZH[o.colour]}{SHAPES_ZH[o.shape]}" for o in objs]
    verb, noun = ("is", "shape") if n == 1 else ("are", "shapes")
    head = f"There {verb} {COUNT_WORDS[n]} {noun} on a {scene.background} background."
    body = [f"A{p[1:]} is {PLACE_PHRASES[o.place]}." for p, o in zip(phrases, objs)]
    head_zh = f"{BACKGROUNDS_ZH[scene.background]}背景上有{COUNT_WORDS_ZH[n]}图形。"
    body_zh = [f"{PLACES_ZH[o.place]}是{p}。" for p, o in zip(phrases_zh, objs)]
    return {
        "caption": _join(phrases, ", ", " and "),
        "describe": " ".join([head, *body]),
        "caption_zh": _join(phrases_zh, "、", "和"),
        "describe_zh": "".join([head_zh, *body_zh]),
    }


def count_texts(scene: Scene) -> dict[str, str]:
    """The `count` tasks: "three shapes" / "三个图形" (the describe texts' own count words)."""
    n = len(scene.objects)
    return {"count": f"{COUNT_WORDS[n]} shape{'s' if n > 1 else ''}", "count_zh": f"{COUNT_WORDS_ZH[n]}图形"}


def all_texts(scene: Scene) -> dict[str, str]:
    """Every text the generator labels: the four tasks of the grammar, then the count tasks."""
    return texts(scene) | count_texts(scene)


def _alt(names) -> str:
    """Regex alternation, longest first so 左上方 wins over 上方."""
    return "(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + ")"


_INV = {  # Chinese word -> English name, per attribute
    "size": {v: k for k, v in SIZES_ZH.items()},
    "colour": {v: k for k, v in COLOURS_ZH.items()},
    "shape": {v: k for k, v in SHAPES_ZH.items()},
    "place": {v: k for k, v in PLACES_ZH.items()},
}
_OBJ_EN = f"an? {_alt(SIZES)} {_alt(COLOURS)} {_alt(SHAPES)}"
_OBJ_ZH = f"一个{_alt(SIZES_ZH.values())}{_alt(COLOURS_ZH.values())}{_alt(SHAPES_ZH.values())}"
_HEAD_EN = re.compile(f"there (?:is|are) {_alt(COUNT_WORDS.values())} shapes? on an? {_alt(BACKGROUNDS)} background")
_SENT_EN = re.compile(f"{_OBJ_EN} is {_alt(PLACE_PHRASES.values())}")
_HEAD_ZH = re.compile(f"{_alt(BACKGROUNDS_ZH.values())}背景上有{_alt(COUNT_WORDS_ZH.values())}图形")
_SENT_ZH = re.compile(f"{_alt(PLACES_ZH.values())}是{_OBJ_ZH}")
_PHRASE_TO_PLACE = {v: k for k, v in PLACE_PHRASES.items()}
_COUNT_OF = {**{w: n for n, w in COUNT_WORDS.items()}, **{w: n for n, w in COUNT_WORDS_ZH.items()}}


def parse_caption(text: str, task: str) -> list[tuple] | None:
    """Objects named by a text, in English names: (size, colour, shape) for the caption tasks,
    (size, colour, shape, place) for the describe tasks. None when the text is off-grammar,
    including a describe text whose stated count disagrees with the objects it lists."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if task.endswith("_zh"):
        text = re.sub(r"\s+", "", text)
    else:
        text = " ".join(text.lower().split())
    if not text:
        return None
    if task == "caption":
        parts = re.split(r",\s*|\s+and\s+", text)
        found = [re.fullmatch(_OBJ_EN, p) for p in parts]
        return [m.groups() for m in found] if all(found) else None
    if task == "caption_zh":
        found = [re.fullmatch(_OBJ_ZH, p) for p in re.split("[、和]", text)]
        return [tuple(_INV[k][v] for k, v in zip(("size", "colour", "shape"), m.groups())) for m in found] if all(found) else None
    sentences = [s.strip() for s in re.split(r"[.。]", text) if s.strip()]
    head_re, sent_re = (_HEAD_EN, _SENT_EN) if task == "describe" else (_HEAD_ZH, _SENT_ZH)
    head = head_re.fullmatch(sentences[0]) if sentences else None
    found = [sent_re.fullmatch(s) for s in sentences[1:]]
    if head is None or not found or not all(found):
        return None
    count = _COUNT_OF[head.group(1) if task == "describe" else head.group(2)]
    if count != len(found):
        return None
    if task == "describe":
        return [(s, c, sh, _PHRASE_TO_PLACE[p]) for s, c, sh, p in (m.groups() for m in found)]
    return [(_INV["size"][s], _INV["colour"][c], _INV["shape"][sh], _INV["place"][p])
            for p, s, c, sh in (m.groups() for m in found)]
