"""Training-step throughput at fp32, bf16 and FP8, and (on a GPU) FP8-vs-bf16 loss curves.

Batches are rendered synthetic scenes tokenised in-process (no data loader), so the
figures are the model's own cost. On a CPU the FP8 backend is `emulate`; with
`--device cuda` it is `scaled_mm`, and `--curves N` trains N steps from the same
initial weights in bf16 and in FP8 and reports both final losses.

    python benchmarks/train_step.py [--presets tiny small] [--steps 4]
    python benchmarks/train_step.py --device cuda --presets small --curves 300
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from lm.loss import IGNORE_INDEX
from mm.config import TASKS, preset
from mm.model import CaptionModel
from mm.tokenizer import Tokenizer
from train.data.scenes import render, sample_rng, sample_scene, texts
from vision.preprocess import build_transform


def make_batches(model, tok, n_batches, batch_size, seed=0):
    tf = build_transform(model.vision.data_config)
    out = []
    for b in range(n_batches):
        task = TASKS[b % len(TASKS)]
        scenes = [sample_scene(sample_rng("train", seed, b * batch_size + i)) for i in range(batch_size)]
        exs = [tok.build_example(model.cfg.tasks[task], texts(s)[task], model.num_image_tokens) for s in scenes]
        t = max(len(e[0]) for e in exs)
        ids = torch.tensor([e[0] + [tok.pad_id] * (t - len(e[0])) for e in exs])
        labels = torch.tensor([e[1] + [IGNORE_INDEX] * (t - len(e[1])) for e in exs])
        mask = (ids != tok.pad_id).long()
        out.append((torch.stack([tf(render(s)) for s in scenes]), ids, mask, labels))
    return out


def build(name, tok, device):
    cfg = preset(name)
    cfg = cfg.replace(lm=cfg.lm.replace(vocab_size=max(cfg.lm.vocab_size, tok.vocab_size)))
    model = CaptionModel(cfg, tok.image_id).to(device)
    model.vision.to_channels_last()
    return model


def step_fn(model, precision, device, lr=1e-3):
    if precision == "fp8":
        from train import fp8

        fp8.convert_to_fp8(model, backend="scaled_mm" if device.type == "cuda" else "emulate",
                           module_filter=lambda n, _m: not n.startswith("vision."))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    dtype = None if precision == "fp32" else torch.bfloat16

    def step(batch):
        images, ids, mask, labels = (t.to(device) for t in batch)
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(images, ids, mask, labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def throughput(name, precision, tok, batches, device):
    torch.manual_seed(0)
    model = build(name, tok, device)
    step = step_fn(model, precision, device)
    step(batches[0])  # warm-up
    times, tokens = [], 0
    for b in batches[1:]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens += int(b[2].sum())
    per_step = statistics.median(times)
    n_images = batches[0][0].shape[0]
    return {"preset": name, "precision": precision, "step_s": round(per_step, 4),
            "images_per_s": round(n_images / per_step, 2),
            "tokens_per_s": round(tokens / len(batches[1:]) / per_step, 1)}


def curves(name, tok, device, steps, batch_size):
    torch.manual_seed(0)
    base = build(name, tok, device)
    batches = make_batches(base, tok, steps, batch_size, seed=1)
    result = {}
    for precision in ("bf16", "fp8"):
        model = copy.deepcopy(base)
        step = step_fn(model, precision, device)
        losses = [step(b) for b in batches]
        result[precision] = {"final_loss": statistics.mean(losses[-20:]), "losses": losses[::10]}
    rel = abs(result["fp8"]["final_loss"] - result["bf16"]["final_loss"]) / result["bf16"]["final_loss"]
    return {"preset": name, "steps": steps, "bf16_final": result["bf16"]["final_loss"],
            "fp8_final": result["fp8"]["final_loss"], "relative_gap": rel}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp8"])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per setting (after one warm-up)")
    ap.add_argument("--batch-size", type=int, default=0, help="default: 64 for tiny, 4 for small on CPU")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--curves", type=int, default=0, help="train N steps bf16 vs fp8 and compare losses")
    args = ap.parse_args()
    device = torch.device(args.device)
    scenes = [texts(sample_scene(sample_rng("train", 99, i))) for i in range(2000)]
    tok = Tokenizer.train([t for s in scenes for t in s.values()], vocab_size=512)
    rows = []
    for name in args.presets:
        bs = args.batch_size or (64 if name == "tiny" or device.type == "cuda" else 4)
        batches = make_batches(build(name, tok, device), tok, args.steps + 1, bs)
        for precision in args.precisions:
            rows.append(throughput(name, precision, tok, batches, device) | {"batch_size": bs})
            print(rows[-1], flush=True)
    print("| preset | batch | precision | s/step | images/s | tokens/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['batch_size']} | {r['precision']} | {r['step_s']} | {r['images_per_s']} "
              f"| {r['tokens_per_s']} |")
    result = {"bench": "train_step", "device": str(device), "threads": torch.get_num_threads(), "rows": rows}
    if args.curves:
        result["curves"] = [curves(n, tok, device, args.curves, args.batch_size or 32) for n in args.presets]
        print(result["curves"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
