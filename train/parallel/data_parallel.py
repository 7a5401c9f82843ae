"""Data parallelism for the one training loop: a single process, DDP, or FSDP2 (train/parallel/dist.py
wraps the model). The loop runs the wrapped `model`; the optimiser, router-bias step and checkpoints
see the unwrapped `parts`. Under FSDP2 a checkpoint gathers the full state to CPU (every rank calls it).

Gradient accumulation under DDP all-reduces on an optimiser step's last micro-step only (`sync`:
DDP's `no_sync` before it, as in nanoGPT and nanoVLM), not grad_accum times for the same mean.
FSDP2 reduce-scatters every micro-step: unsharded gradients kept between them would cost the
memory FSDP exists to save.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from mm.checkpoint import load_state_strict
from mm.model import CaptionModel
from train.config import TrainConfig
from train.parallel.dist import DistInfo, wrap
from train.parallel.router import balance_routers


class DataParallel:
    pipelined = False  # the loop's one branch (trainer.forward_backward): each rank runs the whole model
    holds_loss = True

    def __init__(self, model: CaptionModel, cfg: TrainConfig, info: DistInfo, keep_own: tuple[str, ...] = ()):
        self.parts, self.info, self.data_info, self.dp_size = model, info, info, info.world_size
        self.model = wrap(model, info, cfg.parallel, keep_own)
        self.fsdp = info.enabled and cfg.parallel == "fsdp"

    @property
    def model_cfg(self):
        return self.parts.cfg

    def describe(self) -> str:
        kind = ("FSDP2" if self.fsdp else "DDP") if self.info.enabled else "a single process"
        return f"data parallel: {kind}, {self.dp_size} replica(s)"

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def sync(self, sync: bool):
        """The context of one micro-step's backward: DDP's no_sync unless it is the step's last."""
        if sync or not isinstance(self.model, DDP):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def stop_together(self, done: bool) -> bool:
        """Whether a loop over this rank's batches ends here; each rank decides alone (no collective
        runs in a forward)."""
        return done

    def clip_grads(self, max_norm: float) -> float:
        params = [p for p in self.parts.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))

    def balance_routers(self) -> tuple[torch.Tensor | None, list[float]]:
        return balance_routers(self.parts.lm, self.info)

    def gather_state(self, opt, sched) -> tuple[dict, dict, dict] | None:
        """(weights, optimiser state, scheduler state) on rank 0, None elsewhere (a collective under FSDP)."""
        if self.fsdp:
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(self.parts, options=full)
            optim = get_optimizer_state_dict(self.parts, opt, options=full)
        else:
            weights, optim = self.parts.state_dict(), opt.state_dict()
        return (weights, optim, sched.state_dict()) if self.info.is_main else None

    def load_state(self, weights: dict, blob: dict, opt, sched, path: Path) -> None:
        if self.fsdp:
            full = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
            set_model_state_dict(self.parts, weights, options=full)
            set_optimizer_state_dict(self.parts, opt, blob["optimizer"], options=full)
        else:
            load_state_strict(self.parts, weights, str(path / "model.safetensors"))
            opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])

    def full_model(self, checkpoint) -> CaptionModel:
        """The whole model, for export: this rank's own."""
        return self.parts
