"""The run log: one record per log interval (`log_record`), JSONL metrics, a PNG of the loss
curves, optional TensorBoard. (Caption scores are train/eval/caption_metrics.py.)

Only rank 0 logs. The JSONL file is appended line by line, so a run that stops
keeps everything it logged, and a resumed run continues the same file: first it drops
the records after the step it resumes from (the steps it will log again) and a line
cut short by a kill, so no step appears twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import lm
from lm.hf import atomic_file


def log_record(state, seconds: float, lr: float, data_errors, world_size: int) -> dict:
    """The record of the steps in `state.log_window` (RunState): losses and gradient norm averaged over
    the steps that were not skipped, throughput over all of them and every data replica, expert balance."""
    window = state.log_window
    done = [w for w in window if not w["skipped"]] or window
    n = len(done)
    rec = {"step": state.step, "lr": lr}
    for k in ("loss_main", "loss_mtp", "loss_aux"):
        rec[k] = sum(w[k] for w in done) / n
    rec["grad_norm"] = sum(w.get("grad_norm", 0.0) for w in done) / n
    rec["tokens_per_s"] = sum(w["tokens"] for w in window) * world_size / max(seconds, 1e-9)
    rec["images_per_s"] = sum(w["images"] for w in window) * world_size / max(seconds, 1e-9)
    loads = [w["load"] for w in done if w.get("load") is not None]
    if loads:  # balance over the whole interval (several batches and tasks), per MoE layer
        rec["expert_load_max_over_mean"] = lm.max_over_mean(torch.stack([x.cpu() for x in loads]).sum(0))
        rec["expert_load_last_step"] = done[-1]["load_max_over_mean"]
    rec["skipped_steps"] = state.skipped
    rec["data_errors"] = data_errors.total
    rec["data_errors_by_reason"] = dict(data_errors.counts)
    return rec


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:  # a line cut short when a run was killed mid-write
        return None
    return record if isinstance(record, dict) else None


class RunLog:
    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, record: dict):
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record.get("step", 0))

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [r for line in self.path.read_text(encoding="utf-8").splitlines() if (r := _parse(line))]

    def start_at(self, step: int) -> None:
        """Keep only the records of steps <= `step` (the run continues after it), atomically."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in self.records() if isinstance(r.get("step"), int) and r["step"] <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_file(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def plot(self, png: Path):
        """Loss curves (main, MTP, validation) against the step."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = self.records()
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in [("loss_main", "train (main)"), ("loss_mtp", "train (MTP, weighted)"),
                           ("val_loss", "validation")]:
            pts = [(r["step"], r[key]) for r in recs if key in r]
            if pts:
                ax.plot(*zip(*pts), label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)
