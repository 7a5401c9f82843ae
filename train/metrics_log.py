"""Run logging: JSONL metrics, a PNG of the loss curves, optional TensorBoard.

Only rank 0 logs. The JSONL file is appended line by line, so a run that stops
keeps everything it logged, and a resumed run continues the same file: first it drops
the records after the step it resumes from (the steps it will log again) and a line
cut short by a kill, so no step appears twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


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
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

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
