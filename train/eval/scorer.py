"""`mm eval`: score a checkpoint on webdataset shards.

For each task: BLEU-4, ROUGE-L, CIDEr (pycocoevalcap's scorers) and exact match;
for the synthetic scenes also per-attribute accuracy (count, colour, shape, size,
place), the MTP draft acceptance of self-speculative decoding, and the distribution
of the captions' confidence (mm/confidence.py) with the share flagged as unfamiliar.
`--changes` scores exact match and confidence again with each image changed the way
real images are (`train/data/augment.py` CHANGES: JPEG, rescale, noise, shift, non-square
canvas). Results go to a JSON file and tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from mm.samples import TASKS, DataErrors, good_samples, sample_image, sample_json, sample_texts


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--data", required=True, help="shard URLs (brace patterns allowed)")
    p.add_argument("--task", action="append", default=None, help="task(s) to score (default: all the model knows)")
    p.add_argument("--limit", type=int, default=0, help="score at most N samples (0 = all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write the scores as JSON here")
    p.add_argument("--spec-samples", type=int, default=100,
                   help="images per task decoded with MTP speculation to measure draft acceptance (0 = skip)")
    p.add_argument("--changes", nargs="*", default=None, metavar="CHANGE",
                   help="also score under image changes: names from train/data/augment.py CHANGES, or none "
                        "given = all of them")
    p.add_argument("--changes-limit", type=int, default=200, help="samples scored per change (0 = all)")


def read_samples(urls: str, limit: int = 0, tasks: list[str] | None = None,
                 errors: DataErrors | None = None) -> list[dict]:
    """Decoded samples: {'key', 'image' (PIL), 'texts' {task: text}, 'scene' (dict or None)}, read by the
    same skip-and-count rules as training (`mm/samples.py`); what is skipped is counted in `errors`."""

    def parse(s: dict) -> dict:
        meta = sample_json(s)
        texts = sample_texts(s, tasks or TASKS, meta)
        return {"key": s["__key__"], "image": sample_image(s), "texts": texts, "scene": meta.get("scene")}

    return list(islice(good_samples(urls, DataErrors() if errors is None else errors, parse), limit or None))


def score_captions(cap, samples: list[dict], tasks: list[str], batch_size: int = 32, spec_samples: int = 100) -> dict:
    """Scores from batched greedy decoding; speculation (whose output is the same) runs one
    image at a time, so it is measured on the first `spec_samples` images of each task."""
    import torch

    import lm
    from mm.generate import GenerationConfig, GenerationStats
    from train.eval.caption_metrics import caption_scores, scene_attribute_accuracy

    results, routing = {}, GenerationStats()
    for task in tasks:
        rows = [s for s in samples if task in s["texts"]]
        if not rows:
            continue
        t0, stats = time.perf_counter(), None
        preds, confidence = caption_batches(cap, [r["image"] for r in rows], task, batch_size, routing)
        if spec_samples:
            spec = cap.run([r["image"] for r in rows[:spec_samples]], task=task, speculative=True,
                           draft_tokens=GenerationConfig().drafts(cap.model))  # drafting every time
            stats = spec.stats
            agree = sum(a == b for a, b in zip(spec.texts, preds))
        refs = [[r["texts"][task]] for r in rows]
        scores = caption_scores(preds, refs)
        if task in TASKS and all(r["scene"] for r in rows):  # the grammar's tasks parse back
            scores["attributes"] = scene_attribute_accuracy(preds, [r["scene"] for r in rows], task)
        scores["n"] = len(rows)
        scores["confidence"] = confidence_summary(cap, confidence, task)
        if stats is not None:
            scores["mtp_acceptance"] = stats.acceptance
            scores["draft_tokens"] = GenerationConfig().drafts(cap.model)
            scores["tokens_per_forward"] = stats.tokens_per_forward
            scores["speculative_matches_greedy"] = agree / min(spec_samples, len(rows))
        scores["seconds"] = round(time.perf_counter() - t0, 2)
        scores["examples"] = [{"key": r["key"], "pred": p, "ref": r["texts"][task]}
                              for r, p in list(zip(rows, preds))[:5]]
        results[task] = scores
    if routing.expert_load:  # every token the model read or wrote, all tasks together
        results["expert_load"] = {
            "max_over_mean": lm.max_over_mean(torch.tensor(routing.expert_load)),
            "load": routing.expert_load,
        }
    return results


def caption_batches(cap, images, task: str, batch_size: int, routing=None, desc: str = "") -> tuple[list, list]:
    """Greedy captions and their confidences, in batches (`routing` gathers the expert load)."""
    texts, confidence = [], []
    for i in tqdm(range(0, len(images), batch_size), desc=f"eval {desc or task}", file=sys.stderr, leave=False):
        res = cap.run(images[i : i + batch_size], task=task, speculative=False)
        texts += res.texts
        confidence += res.confidence
        if routing is not None:
            routing.add(res.stats)
    return texts, confidence


def confidence_summary(cap, confidence: list[float], task: str) -> dict:
    """Quantiles of the confidences and the share below the task's threshold."""
    import numpy as np

    q = np.quantile(np.asarray(confidence), [0.0, 0.01, 0.05, 0.5]).round(4).tolist()
    out = dict(zip(("min", "p01", "p05", "median"), q))
    out["unfamiliar"] = (sum(cap.unfamiliar(c, task) for c in confidence) / len(confidence)
                         if cap.threshold(task) is not None else None)
    return out


def score_changes(cap, samples: list[dict], tasks: list[str], changes: list[str], batch_size: int = 32) -> dict:
    """{change: {task: {exact_match, confidence}}} with every image changed by CHANGES[change]."""
    from train.data.augment import CHANGES

    out = {}
    for name in changes:
        images = [CHANGES[name](s["image"]) for s in samples]
        out[name] = {}
        for task in tasks:
            keep = [i for i, s in enumerate(samples) if task in s["texts"]]
            preds, confidence = caption_batches(cap, [images[i] for i in keep], task, batch_size, desc=f"{name} {task}")
            exact = sum(p == samples[i]["texts"][task] for p, i in zip(preds, keep)) / max(1, len(keep))
            out[name][task] = {"exact_match": exact, "n": len(keep),
                               "confidence": confidence_summary(cap, confidence, task)}
    return out


def changes_table(changes: dict) -> str:
    tasks = list(next(iter(changes.values())))
    lines = ["| change | " + " | ".join(tasks) + " | unfamiliar |", "|" + "---|" * (len(tasks) + 2)]
    for name, per_task in changes.items():
        flagged = [s["confidence"]["unfamiliar"] for s in per_task.values()]
        share = "-" if None in flagged else f"{sum(flagged) / len(flagged):.3f}"
        lines.append(f"| {name} | " + " | ".join(f"{per_task[t]['exact_match']:.3f}" for t in tasks) + f" | {share} |")
    return "\n".join(lines)


def table(results: dict) -> str:
    cols = ["exact_match", "bleu4", "rouge_l", "cider", "mtp_acceptance"]
    lines = ["| task | n | " + " | ".join(cols) + " | confidence p01 / median | unfamiliar | attributes |",
             "|" + "---|" * (len(cols) + 5)]
    for task, s in results.items():
        if task in ("expert_load", "data_errors", "changes"):
            continue
        vals = " | ".join("-" if s.get(c) is None else f"{s[c]:.3f}" for c in cols)
        conf = s["confidence"]
        flagged = "-" if conf["unfamiliar"] is None else f"{conf['unfamiliar']:.3f}"
        attrs = ", ".join(f"{k} {v:.3f}" for k, v in s.get("attributes", {}).items())
        lines.append(f"| {task} | {s['n']} | {vals} | {conf['p01']:.3f} / {conf['median']:.3f} | {flagged} | {attrs} |")
    if "expert_load" in results:
        ratios = ", ".join(f"{r:.2f}" for r in results["expert_load"]["max_over_mean"])
        lines.append(f"\nexpert load max/mean per MoE layer (all tasks): {ratios}")
    return "\n".join(lines)


def run(args) -> int:
    from mm.captioner import Captioner

    try:
        from train.data.augment import CHANGES

        changes = None if args.changes is None else (args.changes or list(CHANGES))
        if unknown := sorted(set(changes or ()) - set(CHANGES)):
            raise ValueError(f"unknown change(s) {unknown}; choose from {sorted(CHANGES)}")
        for name in ("limit", "spec_samples", "changes_limit"):
            if getattr(args, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        cap = Captioner.from_pretrained(args.checkpoint, device=args.device)
        tasks = args.task or cap.tasks
        for t in tasks:
            cap.model.cfg.prompt(t)
    except ValueError as e:  # bad options, CheckpointError, ConfigError (an unknown task)
        print(f"mm eval: {e}", file=sys.stderr)
        return 2
    skipped = DataErrors()
    samples = read_samples(args.data, args.limit, tasks, skipped)
    print(f"mm eval: {len(samples)} samples; {skipped.summary()}", file=sys.stderr)
    if not samples:
        print(f"mm eval: no usable samples in {args.data}", file=sys.stderr)
        return 2
    results = score_captions(cap, samples, tasks, args.batch_size, args.spec_samples)
    results["data_errors"] = {"total": skipped.total, "by_reason": dict(skipped.counts),
                              "examples": skipped.examples[:10]}
    if changes:
        subset = samples[: args.changes_limit] if args.changes_limit else samples
        results["changes"] = score_changes(cap, subset, tasks, changes, args.batch_size)
    print(table(results))
    if changes:
        print("\nexact match under image changes (" + str(len(subset)) + " samples per task):\n"
              + changes_table(results["changes"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0
