"""Expert parallelism x data parallelism (`expert_parallel: N`): the routed experts split over N
ranks (train/parallel/expert_dispatch.py), everything else replicated by DDP over all ranks.

Gradients. DDP averages the non-expert parameters over every rank, as without EP. An expert's
gradient on its owner already sums what every token its EP group routed to it contributes (the
all-to-all's backward brings them home); summing that over the expert's replica group (the
world / N ranks holding the same experts) adds the other groups' tokens, and dividing by the
world size gives DDP's average. So each expert gets the gradient a plain DDP run of the same
world size gives it, and the clip norm is the same: the replicated parameters' squared norm
plus the expert parameters' squared norms summed over the EP group.

Checkpoints keep the global layout (every expert, as without EP), so any EP degree, or none,
resumes any checkpoint and exports are unchanged. To save, rank 0 gathers the expert tensors
from its EP group one tensor at a time (weights, then AdamW's moments): no other rank ever
holds more than its own experts. To load, every rank takes its slice of each expert tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from lm.config import CheckpointError, ConfigError
from mm.checkpoint import load_checkpoint
from mm.model import CaptionModel
from train.config import TrainConfig
from train.parallel.data_parallel import DataParallel
from train.parallel.dist import DistInfo
from train.parallel.expert_dispatch import make_expert_groups, shard_experts
from train.parallel.gather import param_names


def check_world(cfg: TrainConfig, info: DistInfo) -> None:
    """What only the launch can tell: the EP degree must divide the torchrun world."""
    n = cfg.expert_parallel
    if n > 1 and info.world_size % n:
        raise ConfigError(f"expert_parallel={n} does not divide the world size {info.world_size}; launch "
                          f"torchrun with a multiple of {n} processes (--nproc_per_node x --nnodes)")


class ExpertParallel(DataParallel):
    def __init__(self, model: CaptionModel, cfg: TrainConfig, info: DistInfo):
        self.groups = make_expert_groups(info, cfg.expert_parallel)
        self.expert_names = shard_experts(model, self.groups)  # name -> global experts along dim 0
        super().__init__(model, cfg, info, keep_own=tuple(self.expert_names))
        params = dict(model.named_parameters())
        self.expert_params = [params[n] for n in self.expert_names if n in params and params[n].requires_grad]

    def describe(self) -> str:
        g = self.groups
        return (f"{super().describe()}; expert parallel: {g.ep_size} ranks per EP group, {g.replicas} "
                f"replica(s) of each expert, {len(self.expert_names)} expert tensors sharded")

    def stop_together(self, done: bool) -> bool:
        """Every forward is a collective of the EP group, so a loop over batches (the validation
        loss) ends on every rank as soon as one rank has no batch left."""
        flag = torch.tensor([float(done)], device=self.info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag[0])

    def clip_grads(self, max_norm: float) -> float:
        """Reduce the expert gradients over their replica group, clip by the norm of the whole model."""
        self.reduce_expert_grads()
        own = {id(p) for p in self.expert_params}
        params = [p for p in self.parts.parameters() if p.grad is not None]
        replicated = [p.grad for p in params if id(p) not in own]
        sharded = torch.stack([norm_squared([p.grad for p in self.expert_params], self.info.device)])
        dist.all_reduce(sharded, group=self.groups.ep_group)
        total = (norm_squared(replicated, self.info.device) + sharded[0]).sqrt()
        if max_norm > 0 and params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(params[0].grad.dtype))
        return float(total)

    def reduce_expert_grads(self) -> None:
        """Sum over the replica group / world size: DDP's mean over all ranks' tokens (see the docstring)."""
        for p in self.expert_params:
            if p.grad is None:  # every rank takes part in the all-reduce, used or not
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.expert_params]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.groups.replica_group)
        flat /= self.info.world_size
        for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(r)

    def gather_state(self, opt, sched) -> tuple[dict, dict, dict] | None:
        """(weights, optimiser state, scheduler state) in the global layout on rank 0, None elsewhere."""
        weights, optim = self.parts.state_dict(), opt.state_dict()
        if self.info.rank < self.groups.ep_size:  # the first replica: rank 0's EP group
            for name in self.expert_names:
                weights[name] = self.gather_experts(weights[name])
            names = param_names(opt, self.parts)
            optim["state"] = {i: ({k: self.gather_experts(v) if self._is_slice(v, names[i]) else v
                                   for k, v in s.items()} if names[i] in self.expert_names else s)
                              for i, s in optim["state"].items()}
        return (weights, optim, sched.state_dict()) if self.info.is_main else None

    def _is_slice(self, t, name: str) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() >= 1 and \
            t.shape[0] == self.expert_names[name] // self.groups.ep_size

    def gather_experts(self, t: torch.Tensor) -> torch.Tensor:
        """Every EP rank's slice of one expert tensor, concatenated on EP rank 0 (the others get theirs back)."""
        first = self.groups.ep_rank == 0
        parts = [torch.empty_like(t) for _ in range(self.groups.ep_size)] if first else None
        dist.gather(t.contiguous(), parts, group=self.groups.ep_group, group_dst=0)
        return torch.cat(parts).cpu() if first else t

    def load_state(self, weights: dict, blob: dict, opt, sched, path: Path) -> None:
        """This rank's slices of the global checkpoint's expert tensors and their optimiser state."""
        weights = dict(weights)
        for name, n in self.expert_names.items():
            if name in weights:
                weights[name] = self.own_slice(weights[name], n, f"{path / 'model.safetensors'}: {name}")
        names, saved = param_names(opt, self.parts), blob["optimizer"]
        state = {i: ({k: self.own_slice(v, self.expert_names[names[i]], f"optimiser state of {names[i]}")
                      if isinstance(v, torch.Tensor) and v.dim() >= 1 else v for k, v in s.items()}
                     if i < len(names) and names[i] in self.expert_names else s)
                 for i, s in saved["state"].items()}
        super().load_state(weights, dict(blob, optimizer=dict(saved, state=state)), opt, sched, path)

    def own_slice(self, t: torch.Tensor, n_experts: int, what: str) -> torch.Tensor:
        if t.shape[0] != n_experts:
            raise CheckpointError(f"{what}: {t.shape[0]} experts along dim 0, this model has {n_experts} "
                                  f"(a checkpoint of another model?)")
        return t[self.groups.owned(n_experts)]

    def full_model(self, checkpoint) -> CaptionModel:
        """The whole model, for export: read back from the last (gathered) checkpoint."""
        return load_checkpoint(checkpoint)[0]


def norm_squared(grads: list[torch.Tensor], device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(grads).float().square()

