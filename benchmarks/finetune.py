"""Full fine-tuning vs LoRA on the same model and batches: trainable parameters, optimiser-state
bytes, peak RSS and images/s.

Each variant runs in its own process (this script re-invoked with --variant), so each peak RSS
is that variant's own: the model, its gradients, the optimiser state and the activations of
a training step. Both build the same model from the same seed and train on the same rendered
scenes (no data loader); `full` trains everything, as `mm finetune --stage full`; `lora` freezes
the model and trains the default adapters (attention, MLPs, routed experts), as `--stage lora`.

    python benchmarks/finetune.py [--preset small] [--batch-size 2] [--steps 3] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step.py beside this file

VARIANTS = ("full", "lora")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v))


def build(args):
    from train_step import build as build_model
    from train_step import make_batches

    from mm.tokenizer import Tokenizer
    from train.data.scenes import sample_rng, sample_scene, texts

    torch.manual_seed(0)
    scenes = [texts(sample_scene(sample_rng("train", 1, i))) for i in range(500)]
    tok = Tokenizer.train([t for s in scenes for t in s.values()], vocab_size=512)
    model = build_model(args.preset, tok, torch.device(args.device))
    return model, make_batches(model, tok, args.steps + 1, args.batch_size)


def make_trainable(model, variant: str, rank: int) -> None:
    from train.config import LoRAConfig
    from train.finetune import set_stage
    from train.lora import apply_lora

    if variant == "full":
        set_stage(model, "full", [], 0)
        return
    lora = LoRAConfig(enabled=True, rank=rank, alpha=2.0 * rank)
    set_stage(model, "lora", [], 0, lora)
    apply_lora(model, lora)


def run_variant(args) -> dict:
    torch.set_num_threads(args.threads)
    model, batches = build(args)
    make_trainable(model, args.variant, args.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.precision]
    model.train()
    times = []
    for i, (images, ids, mask, labels) in enumerate(batches):  # the first step warms up, untimed
        dev = torch.device(args.device)
        images = images.to(dev).contiguous(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(images, ids.to(dev), mask.to(dev), labels.to(dev)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    total = sum(p.numel() for p in model.parameters())
    out = {"variant": args.variant, "trainable": sum(p.numel() for p in params), "parameters": total,
           "optimizer_state_bytes": optimizer_state_bytes(opt), "peak_rss_mib": round(peak_rss_mib(), 1),
           "step_s": round(step_s, 3), "images_per_s": round(args.batch_size / step_s, 2)}
    if args.device.startswith("cuda"):
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def table(rows: list[dict]) -> str:
    cols = ["trainable", "optimizer_state_bytes", "peak_rss_mib", "step_s", "images_per_s"]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {r['variant']} | " + " | ".join(f"{r[c]:,}" for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # one child process
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    full, lora = rows
    print(f"preset {args.preset}, batch {args.batch_size}, {args.precision}, {args.device}, {args.threads} thread(s), "
          f"{rows[0]['parameters'] / 1e6:.1f}M parameters")
    print(table(rows))
    result = {"preset": args.preset, "batch_size": args.batch_size, "precision": args.precision,
              "device": args.device, "variants": rows,
              "lora_trainable_fraction": round(lora["trainable"] / lora["parameters"], 4),
              "peak_rss_lora_over_full": round(lora["peak_rss_mib"] / full["peak_rss_mib"], 3),
              "step_time_lora_over_full": round(lora["step_s"] / full["step_s"], 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
