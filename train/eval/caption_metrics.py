"""Caption metrics: BLEU, ROUGE-L and CIDEr from pycocoevalcap, exact match, and attribute accuracy.

The three n-gram scores are pycocoevalcap's pure-Python scorers (BLEU with the
"closest" reference length, ROUGE-L with beta 1.2, CIDEr-D with sigma 6 and its
x10 scale), fed with our own tokens instead of the Java PTB tokenizer: lower
case, punctuation dropped, words split on whitespace, and each CJK character a
token of its own (Chinese has no spaces, and character n-grams are the usual
unit for Chinese caption metrics). CIDEr's idf comes from the reference set
itself, so it is only meaningful over a corpus of several images: with a single
image every n-gram has idf 0 and CIDEr is 0.

`scene_attribute_accuracy` reads the synthetic scenes' texts back with
`train.data.scenes.parse_caption` and scores each attribute separately, which says
*what* a model gets wrong (shape, size, ...) where exact match only says that
it is wrong.
"""

from __future__ import annotations

import json
import re

from train.data.scenes import Scene, parse_caption

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+(?:'[^\\W_{_CJK}]+)*")  # one CJK char, or a word (don't, 3d)


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _normalise(text: str) -> str:
    return " ".join(text.split())


def caption_scores(preds: list[str], refs: list[list[str]]) -> dict:
    """Corpus scores of predictions against one or more references per image."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} reference lists; need one list per prediction")
    if not preds:
        raise ValueError("no predictions to score")
    if any(isinstance(r, str) or not r for r in refs):
        raise ValueError("each entry of refs must be a non-empty list of reference strings")
    # Imported here: pycocoevalcap is the optional `eval` extra, not needed to train.
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res = {i: [" ".join(tokenize(p))] for i, p in enumerate(preds)}
    gts = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    # CIDEr's document frequencies are undefined when no reference has a token at all.
    cider = Cider().compute_score(gts, res)[0] if any(r for rs in gts.values() for r in rs) else 0.0
    exact = sum(any(_normalise(p) == _normalise(r) for r in rs) for p, rs in zip(preds, refs))
    return {
        "bleu1": float(bleu[0]),
        "bleu4": float(bleu[3]),
        "rouge_l": float(rouge),
        "cider": float(cider),
        "exact_match": exact / len(preds),
        "n": len(preds),
    }


def _scene_of(item: dict | str) -> Scene:
    """A scene from a sample's json (with "scene"), its text, or a bare scene dict."""
    d = json.loads(item) if isinstance(item, (str, bytes)) else item
    return Scene.from_dict(d.get("scene", d))


def scene_attribute_accuracy(preds: list[str], scenes_json: list[dict | str], task: str) -> dict:
    """Fraction right per attribute. `count` and `scene` (every attribute of every object and the count)
    are per image; size, colour, shape and place (describe tasks only) are per true object, compared with
    the predicted object at the same position in reading order. A text that does not parse scores 0."""
    if len(preds) != len(scenes_json):
        raise ValueError(f"{len(preds)} predictions but {len(scenes_json)} scenes")
    if not preds:
        raise ValueError("no predictions to score")
    attrs = ["size", "colour", "shape"] + (["place"] if task.startswith("describe") else [])
    right = dict.fromkeys(["parsed", "count", "scene", *attrs], 0)
    n_objects = 0
    for pred, item in zip(preds, scenes_json):
        truth = [(o.size, o.colour, o.shape, o.place)[: len(attrs)] for o in _scene_of(item).objects]
        got = parse_caption(pred, task)
        n_objects += len(truth)
        if got is None:
            continue
        right["parsed"] += 1
        right["count"] += len(got) == len(truth)
        right["scene"] += got == truth
        for i, want in enumerate(truth):
            if i < len(got):
                for j, name in enumerate(attrs):
                    right[name] += got[i][j] == want[j]
    n = len(preds)
    out = {k: right[k] / n for k in ("parsed", "count", "scene")}
    out.update({k: right[k] / max(1, n_objects) for k in attrs})
    out["n"] = n
    return out
