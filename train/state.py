"""The run state: what the loop updates after every step and a checkpoint saves besides weights,
optimiser and RNG; built, counted, saved and restored here only. `log_window` holds the steps
since the last log record, so a resumed run's first record averages the same steps as an
uninterrupted run's (its throughput counts, this process's own, restart at zero)."""

from __future__ import annotations

from dataclasses import dataclass, field

STATE_FILE = "train_state/state.pt"  # in a checkpoint: this state, optimiser, scheduler and RNG
SAVED = ("step", "data", "bad_steps", "skipped")  # what every training checkpoint holds (older ones: no window)


@dataclass
class RunState:
    step: int = 0  # optimiser steps taken
    data: dict = field(default_factory=lambda: {"epoch": 0, "batch": 0})  # the stream's position (data/stream.py)
    bad_steps: int = 0  # consecutive steps skipped for a non-finite loss
    skipped: int = 0  # steps skipped in the whole run
    log_window: list[dict] = field(default_factory=list)  # step stats since the last log record

    def count(self, stats: dict, position: dict) -> None:
        """One optimiser step done (or skipped): `stats` from train_step, `position` the stream's after it."""
        self.step += 1
        self.data = position
        self.skipped += stats["skipped"]
        self.bad_steps = self.bad_steps + 1 if stats["skipped"] else 0
        self.log_window.append(stats)

    def to_dict(self) -> dict:
        return {"step": self.step, "data": self.data, "bad_steps": self.bad_steps, "skipped": self.skipped,
                "log_window": self.log_window}

    @classmethod
    def from_saved(cls, blob: dict) -> RunState:
        window = [dict(w, tokens=0, images=0) for w in blob.get("log_window", [])]
        return cls(**{k: blob[k] for k in SAVED}, log_window=window)
