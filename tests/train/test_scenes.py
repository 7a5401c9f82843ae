"""The scene grammar: texts, geometry, rendered pixels, determinism and parsing."""

from collections import Counter

import numpy as np
import pytest

from train.data import scenes
from train.data.scenes import Scene, SceneObject


def _scenes(n, split="train", seed=0):
    return [scenes.sample_scene(scenes.sample_rng(split, seed, i)) for i in range(n)]


ONE = Scene("white", [SceneObject(0, "circle", "red", "large", 30, 21, 21)])
THREE = Scene("gray", [
    SceneObject(0, "circle", "red", "large", 30, 21, 21),
    SceneObject(4, "square", "blue", "small", 14, 64, 64),
    SceneObject(8, "diamond", "yellow", "small", 16, 107, 107),
])


def test_texts_of_fixed_scenes():
    assert scenes.texts(ONE) == {
        "caption": "a large red circle",
        "describe": "There is one shape on a white background. A large red circle is at the top left.",
        "caption_zh": "一个大的红色圆形",
        "describe_zh": "白色背景上有一个图形。左上方是一个大的红色圆形。",
    }
    assert scenes.texts(THREE) == {
        "caption": "a large red circle, a small blue square and a small yellow diamond",
        "describe": "There are three shapes on a gray background. A large red circle is at the top left. "
                    "A small blue square is in the center. A small yellow diamond is at the bottom right.",
        "caption_zh": "一个大的红色圆形、一个小的蓝色正方形和一个小的黄色菱形",
        "describe_zh": "灰色背景上有三个图形。左上方是一个大的红色圆形。中间是一个小的蓝色正方形。右下方是一个小的黄色菱形。",
    }
    two = Scene("black", [SceneObject(3, "triangle", "green", "small", 12, 21, 64),
                          SceneObject(5, "square", "purple", "large", 28, 107, 64)])
    t = scenes.texts(two)
    assert t["caption"] == "a small green triangle and a large purple square"
    assert t["describe"] == ("There are two shapes on a black background. A small green triangle is on the left. "
                             "A large purple square is on the right.")
    assert t["caption_zh"] == "一个小的绿色三角形和一个大的紫色正方形"
    assert t["describe_zh"] == "黑色背景上有两个图形。左侧是一个小的绿色三角形。右侧是一个大的紫色正方形。"


def test_sampled_scenes_follow_the_grammar_and_parse_back():
    cell = 128 / 3
    for s in _scenes(300):
        assert 1 <= len(s.objects) <= 3 and s.background in scenes.BACKGROUNDS
        cells = [o.cell for o in s.objects]
        assert cells == sorted(set(cells))
        for o in s.objects:
            lo, hi = scenes.SIZES[o.size]
            assert lo <= o.side <= hi and o.shape in scenes.SHAPES and o.colour in scenes.COLOURS
            assert abs(o.x - (o.cell % 3 + 0.5) * cell) <= 4 and abs(o.y - (o.cell // 3 + 0.5) * cell) <= 4
            x0, y0, x1, y1 = o.box()
            assert 0 <= x0 and 0 <= y0 and x1 < 128 and y1 < 128 and x1 - x0 + 1 == o.side
        for task, text in scenes.texts(s).items():
            want = [(o.size, o.colour, o.shape) + ((o.place,) if task.startswith("describe") else ())
                    for o in s.objects]
            assert scenes.parse_caption(text, task) == want, (task, text)


def test_attributes_are_uniform():
    objs = [o for s in _scenes(3000, seed=5) for o in s.objects]
    counts = Counter(len(s.objects) for s in _scenes(3000, seed=5))
    for values, names in [(counts, (1, 2, 3)), (Counter(o.shape for o in objs), scenes.SHAPES),
                          (Counter(o.colour for o in objs), scenes.COLOURS), (Counter(o.size for o in objs), scenes.SIZES),
                          (Counter(o.cell for o in objs), range(9))]:
        total = sum(values.values())
        for name in names:  # each within 20% of its share: sampling noise at these counts is < 8%
            assert abs(values[name] / total - 1 / len(names)) < 0.2 / len(names), (name, values)


def test_rendered_pixels_stay_in_their_boxes():
    for s in _scenes(150, seed=1):
        img = np.asarray(scenes.render(s))
        assert img.shape == (128, 128, 3)
        owner = np.full((128, 128), -1)
        for i, o in enumerate(s.objects):
            x0, y0, x1, y1 = o.box()
            assert (owner[y0:y1 + 1, x0:x1 + 1] == -1).all(), "boxes overlap"
            owner[y0:y1 + 1, x0:x1 + 1] = i
        drawn = (img != scenes.BACKGROUNDS[s.background]).any(-1)
        assert (owner[drawn] >= 0).all(), "a drawn pixel lies outside every box"
        for i, o in enumerate(s.objects):
            mine = drawn & (owner == i)
            assert mine.sum() > o.side  # something substantial was drawn
            assert (img[mine] == scenes.COLOURS[o.colour]).all(), "anti-aliased or wrong colour"


def test_shape_pixels():
    def draw(shape, side=15, bg="black"):
        o = SceneObject(4, shape, "red", "small", side, 64, 64)
        return o, np.asarray(scenes.render(Scene(bg, [o])))

    red, black = (220, 40, 40), (0, 0, 0)
    o, img = draw("circle")
    x0, y0, x1, y1 = o.box()  # the same box for every shape below: same side and centre
    assert tuple(img[o.y, o.x]) == red and tuple(img[0, 0]) == black and tuple(img[y0, x0]) == black
    o, img = draw("square")
    assert (img[y0:y1 + 1, x0:x1 + 1] == red).all() and (img[y0 - 1, x0:x1 + 1] == black).all()
    o, img = draw("triangle")
    filled = (img == red).all(-1)
    assert filled[y1, x0:x1 + 1].all()  # base along the bottom edge
    top = np.flatnonzero(filled[y0])
    assert 1 <= len(top) <= 2 and abs(top.mean() - (x0 + x1) / 2) <= 0.5  # apex at the top centre
    o, img = draw("diamond")
    filled = (img == red).all(-1)
    for y, x in [(y0, x0), (y0, x1), (y1, x0), (y1, x1)]:
        assert not filled[y, x]
    for y, x in [(y0, 64), (64, x0), (64, x1), (y1, 64)]:  # edge midpoints (odd side: centre is a pixel)
        assert filled[y, x]
    assert tuple(np.asarray(scenes.render(Scene("gray", [])))[5, 5]) == (128, 128, 128)


def test_determinism_and_disjoint_splits():
    a, b = _scenes(40), _scenes(40)
    assert a == b
    val = _scenes(40, split="val")
    assert sum(x == y for x, y in zip(a, val)) < 5
    seeds = {scenes.split_seed(split, s) for split in scenes.SPLITS for s in range(1000)}
    assert len(seeds) == 3000
    with pytest.raises(ValueError, match="unknown split"):
        scenes.split_seed("dev", 0)
    with pytest.raises(ValueError, match="non-negative"):
        scenes.split_seed("train", -1)


def test_parse_rejects_off_grammar_text():
    assert scenes.parse_caption("a large red circle and a big blue square", "caption") is None
    assert scenes.parse_caption("", "caption") is None
    assert scenes.parse_caption("a  Large red circle", "caption") == [("large", "red", "circle")]
    bad_count = "There are two shapes on a white background. A large red circle is at the top left."
    assert scenes.parse_caption(bad_count, "describe") is None
    assert scenes.parse_caption("白色背景上有一个图形。左上方是一个大的红色圆。", "describe_zh") is None
    assert scenes.parse_caption("一个大的红色圆形和一个小的紫色菱形", "caption_zh") == [
        ("large", "red", "circle"), ("small", "purple", "diamond")]
    with pytest.raises(ValueError, match="unknown task"):
        scenes.parse_caption("x", "summary")


def test_scene_dict_round_trip():
    for s in _scenes(20):
        assert Scene.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="background"):
        Scene.from_dict({"objects": []})
