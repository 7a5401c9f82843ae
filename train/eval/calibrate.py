"""`mm calibrate`: fit a checkpoint's image-familiarity statistics and its confidence threshold.

1. Fit: the mean-pooled encoder features of `--fit` training-like images, each drawn
   through the training augmentation (train/data/augment.py), give the Gaussian whose
   Mahalanobis distance scores familiarity (mm/confidence.py).
2. Thresholds: held-out images, each under every change evaluation reports (CHANGES:
   JPEG, rescale, noise, shift, canvas), are captioned with every task; a task's threshold
   is the `--max-flagged` quantile of its confidences, so that share of ordinary, changed
   in-world images is flagged and no more.
3. Check: photographs and other non-scene images found offline in installed packages
   (scikit-image's sample data, matplotlib's and gradio's bundled pictures), each whole
   and as random crops, are captioned and the share flagged is reported. They play no
   part in choosing the threshold.

Without `--data` the in-world images are the synthetic scenes (training split for the fit,
validation split for the threshold). The result is written into the checkpoint as
`calibration.safetensors`, with the figures in its metadata and printed.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

# scikit-image sample images that are photographs (the rest of its samples are drawings)
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "grass",
                  "gravel", "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "retina",
                  "rocket", "text")
SKIMAGE_GRAPHICS = ("binary_blobs", "checkerboard", "colorwheel", "horse", "logo", "page", "shepp_logan_phantom")


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True, help="checkpoint directory to calibrate (written in place)")
    p.add_argument("--data", default="", help="in-world shards instead of the synthetic scenes (first --fit "
                                              "samples fit, the next --held-out choose the threshold)")
    p.add_argument("--fit", type=int, default=4096, help="augmented images the feature statistics are fitted on")
    p.add_argument("--held-out", type=int, default=200, help="images scored under every change for the threshold")
    p.add_argument("--tasks", nargs="+", default=None, help="tasks to calibrate (default: all the model knows)")
    p.add_argument("--max-flagged", type=float, default=0.005,
                   help="share of held-out changed images allowed below the threshold")
    p.add_argument("--crops", type=int, default=5, help="random crops of each offline picture, besides the whole")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def offline_pictures() -> list[tuple[str, str, Image.Image]]:
    """(name, "photo" | "graphic", image) for every picture installed packages ship; none are fetched."""
    out = []
    try:
        import skimage.data as skd

        for kind, names in (("photo", SKIMAGE_PHOTOS), ("graphic", SKIMAGE_GRAPHICS)):
            for name in names:
                arr = np.asarray(getattr(skd, name)())
                arr = (arr * 255).astype(np.uint8) if arr.dtype != np.uint8 else arr
                out.append((f"skimage/{name}", kind, Image.fromarray(arr).convert("RGB")))
        faces = skd.lfw_subset()[:20]  # 25x25 grey face photographs
        out += [(f"skimage/lfw_{i}", "photo", Image.fromarray((f * 255).astype(np.uint8)).convert("RGB"))
                for i, f in enumerate(faces)]
    except ImportError:
        print("mm calibrate: scikit-image is not installed; its sample pictures are skipped", file=sys.stderr)
    for package, graphics in (("matplotlib", ("logo2", "Minduka")), ("gradio", ("avatar", "logo", "screenshot"))):
        try:
            root = os.path.dirname(__import__(package).__file__)
        except ImportError:
            continue
        for path in sorted(glob.glob(os.path.join(root, "**", "*.*"), recursive=True)):
            name = os.path.basename(path)
            if os.path.splitext(name)[1].lower() not in (".jpg", ".jpeg", ".png", ".gif") or "test" in path:
                continue
            if package == "gradio" and "media_assets" not in path:
                continue
            if package == "matplotlib" and "sample_data" not in path:
                continue
            kind = "graphic" if any(g in name for g in graphics) else "photo"
            out.append((f"{package}/{name}", kind, Image.open(path).convert("RGB")))
    return out


def views(img: Image.Image, crops: int, rng: random.Random) -> list[Image.Image]:
    """The whole picture and `crops` random crops (35-100% of the shorter side, aspect 3:4 to 4:3)."""
    out = [img]
    w, h = img.size
    for _ in range(crops):
        side = rng.uniform(0.35, 1.0) * min(w, h)
        aspect = np.exp(rng.uniform(np.log(0.75), np.log(4 / 3)))
        cw, ch = min(w, max(8, round(side * aspect))), min(h, max(8, round(side / aspect)))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        out.append(img.crop((x, y, x + cw, y + ch)))
    return out


def in_world(args, start: int, n: int, split: str) -> list[Image.Image]:
    """n in-world images: shard samples start..start+n-1, or synthetic scenes of `split`."""
    if args.data:
        from train.eval.scorer import read_samples

        samples = read_samples(args.data, start + n)[start:]
        if len(samples) < n:
            raise ValueError(f"{args.data} holds {start + len(samples)} usable samples; calibration needs {start + n}")
        return [s["image"] for s in samples]
    from train.data.scenes import render, sample_rng, sample_scene

    return [render(sample_scene(sample_rng(split, args.seed, start + i))) for i in range(n)]


@torch.inference_mode()
def pooled_features(cap, images: list[Image.Image], batch_size: int) -> torch.Tensor:
    feats = [cap.model.vision(cap.pixels(images[i : i + batch_size])).float()
             for i in tqdm(range(0, len(images), batch_size), desc="features", file=sys.stderr, leave=False)]
    return torch.cat(feats)  # [n, N, C]


def confidences(cap, images: list[Image.Image], tasks: list[str], batch_size: int, desc: str) -> dict:
    """{task: confidences [len(images)]} (the captions themselves are not needed here)."""
    from train.eval.scorer import caption_batches

    return {t: np.asarray(caption_batches(cap, images, t, batch_size, desc=f"{desc} {t}")[1]) for t in tasks}


def calibrate(cap, args, fit_images: list[Image.Image], held: list[Image.Image], say=print):
    """Fit on `fit_images`, threshold on `held` and check (module docstring); returns the
    Calibration, already set on cap.model."""
    from mm.confidence import Calibration, fit
    from train.config import AugmentConfig
    from train.data.augment import CHANGES, Augment

    rng = random.Random(args.seed)
    augment = Augment(AugmentConfig(enabled=True))
    fit_images = [augment(im, rng) for im in fit_images]
    feats = pooled_features(cap, fit_images, args.batch_size)
    mean, whiten = fit(feats.mean(1))
    changed = {name: [change(im) for im in held] for name, change in CHANGES.items()}
    probe = Calibration(mean, whiten, radius=0.0, softness=1.0, thresholds={}, info={})
    dist = torch.cat([probe.distance(pooled_features(cap, ims, args.batch_size)) for ims in changed.values()])
    # familiarity ~1 over the changed in-world images; 1.5 (and softness radius / 10) flagged the most
    # photographs at the same share of flagged scenes among the rules tried on half the photo sources
    radius = 1.5 * float(dist.quantile(0.999))
    cap.model.calibration = Calibration(mean, whiten, radius, radius / 10, thresholds={}, info={})
    scene_conf = {name: confidences(cap, ims, args.tasks, args.batch_size, name) for name, ims in changed.items()}
    # "lower": a value of the sample, so at most max_flagged of it lies strictly below
    thresholds = {t: float(np.quantile(np.concatenate([c[t] for c in scene_conf.values()]), args.max_flagged,
                                       method="lower")) for t in args.tasks}
    pictures = offline_pictures()
    flagged, counts = {"photo": [], "graphic": []}, {"photo": 0, "graphic": 0}
    for name, kind, img in tqdm(pictures, desc="offline pictures", file=sys.stderr, leave=False):
        conf = confidences(cap, views(img, args.crops, rng), args.tasks, args.batch_size, name)
        flagged[kind] += [bool(c < thresholds[t]) for t, v in conf.items() for c in v]
        counts[kind] += 1

    def share(conf: dict) -> float:
        return float(np.mean([c < thresholds[t] for t, v in conf.items() for c in v]))

    info = {
        "fit_images": args.fit, "held_out_images": args.held_out, "tasks": args.tasks, "data": args.data or "scenes",
        "max_flagged": args.max_flagged,
        "held_out_flagged": {k: share(v) for k, v in scene_conf.items()},
        "pictures": {k: {"sources": counts[k], "images": len(v) // len(args.tasks),
                         "flagged": float(np.mean(v)) if v else None} for k, v in flagged.items()},
    }
    cal = Calibration(mean, whiten, radius, radius / 10, thresholds, info)
    cap.model.calibration = cal
    say("thresholds " + ", ".join(f"{t} {v:.4f}" for t, v in thresholds.items()) + f" (radius {radius:.2f}); "
        "held-out in-world images flagged per change: "
        + ", ".join(f"{k} {v:.3f}" for k, v in info["held_out_flagged"].items()))
    for kind, v in info["pictures"].items():
        if v["flagged"] is not None:
            say(f"offline {kind}s: {v['sources']} pictures, {v['images']} views x {len(args.tasks)} tasks, "
                f"{v['flagged']:.3f} flagged")
    return cal


def run(args) -> int:
    from mm.captioner import Captioner
    from mm.checkpoint import check_writable_dir

    try:
        if args.fit < 64 or args.held_out < 1 or not 0 <= args.max_flagged < 1 or args.crops < 0:
            raise ValueError("need --fit >= 64, --held-out >= 1, --crops >= 0 and 0 <= --max-flagged < 1")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if os.path.isdir(args.checkpoint):  # the result is written into it: know now, not after the work
            check_writable_dir(args.checkpoint, f"--checkpoint {args.checkpoint}")
        # the images before the model: missing or short --data fails in seconds
        fit_images = in_world(args, 0, args.fit, "train")
        held = in_world(args, args.fit, args.held_out, "val")
        cap = Captioner.from_pretrained(args.checkpoint, batch_size=args.batch_size)  # as users load it
        cap.model.calibration = None  # a stale one must not shape the new fit
        args.tasks = args.tasks or cap.tasks
        for t in args.tasks:
            cap.model.cfg.prompt(t)
    except ValueError as e:  # bad options or data, CheckpointError, ConfigError (an unknown task)
        print(f"mm calibrate: {e}", file=sys.stderr)
        return 2
    cal = calibrate(cap, args, fit_images, held)
    try:
        cal.save(args.checkpoint)
    except ValueError as e:  # CheckpointError: a full disk, say
        print(f"mm calibrate: {e}", file=sys.stderr)
        return 2
    print(f"mm calibrate: wrote {os.path.join(args.checkpoint, 'calibration.safetensors')}")
    return 0
