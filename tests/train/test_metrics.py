"""Caption metrics and per-attribute accuracy on synthetic scenes."""

import json

import pytest

from train.data import scenes
from train.eval.caption_metrics import caption_scores, scene_attribute_accuracy, tokenize


def _sample(n=6, seed=0):
    return [scenes.sample_scene(scenes.sample_rng("val", seed, i)) for i in range(n)]


@pytest.mark.parametrize("task", scenes.TASKS)
def test_identical_predictions_score_perfectly(task):
    refs = [[scenes.texts(s)[task]] for s in _sample()]
    scores = caption_scores([r[0] for r in refs], refs)
    assert scores["exact_match"] == 1.0 and scores["cider"] > 0
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6) and scores["rouge_l"] == pytest.approx(1.0)


def test_worse_predictions_score_lower():
    sc = _sample()
    refs = [[scenes.texts(s)["caption"]] for s in sc]
    good = caption_scores([r[0] for r in refs], refs)
    # Swap every colour word for another colour: the same length, fewer matching n-grams.
    wrong = [r[0].replace("red", "TMP").replace("blue", "red").replace("TMP", "blue")
             .replace("green", "orange") for r in refs]
    bad = caption_scores(wrong, refs)
    assert bad["exact_match"] < 1 and bad["bleu4"] < good["bleu4"] and bad["cider"] < good["cider"]
    # Whitespace and surrounding blanks do not count against exact match; case does.
    spaced = caption_scores(["  a large   red circle "], [["a large red circle"]])
    assert spaced["exact_match"] == 1.0
    assert caption_scores(["A large red circle"], [["a large red circle"]])["exact_match"] == 0.0


def test_tokenizer_splits_chinese_into_characters_and_drops_punctuation():
    assert tokenize("A large red circle, and a small one.") == ["a", "large", "red", "circle", "and", "a", "small", "one"]
    assert tokenize("一个大的红色圆形、一个小的") == list("一个大的红色圆形一个小的")


def test_input_checks():
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        caption_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list"):
        caption_scores(["a"], ["a"])


@pytest.mark.parametrize("task", scenes.TASKS)
def test_a_wrong_colour_lowers_colour_accuracy_only(task):
    sc = _sample(8)
    truth = [s.to_dict() for s in sc]
    preds = [scenes.texts(s)[task] for s in sc]
    perfect = scene_attribute_accuracy(preds, truth, task)
    attrs = ["size", "colour", "shape"] + (["place"] if task.startswith("describe") else [])
    assert all(perfect[k] == 1.0 for k in ["parsed", "count", "scene", *attrs])

    changed = scenes.Scene.from_dict(truth[0])
    o = changed.objects[0]
    o.colour = "green" if o.colour != "green" else "red"
    preds[0] = scenes.texts(changed)[task]
    acc = scene_attribute_accuracy(preds, [json.dumps({"scene": t}) for t in truth], task)  # sample-json form
    n_objects = sum(len(s.objects) for s in sc)
    assert acc["colour"] == pytest.approx(1 - 1 / n_objects)
    assert acc["scene"] == pytest.approx(1 - 1 / len(sc))
    assert all(acc[k] == 1.0 for k in ["parsed", "count", *attrs] if k != "colour")


def test_unparseable_and_missing_objects():
    sc = _sample(4)
    truth = [s.to_dict() for s in sc]
    preds = [scenes.texts(s)["caption"] for s in sc]
    preds[1] = "a picture of something"
    acc = scene_attribute_accuracy(preds, truth, "caption")
    assert acc["parsed"] == 0.75 and acc["count"] == 0.75
    per_object = 1 - len(sc[1].objects) / sum(len(s.objects) for s in sc)
    assert acc["shape"] == pytest.approx(per_object) and acc["size"] == pytest.approx(per_object)
