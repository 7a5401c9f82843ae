"""Expert parallelism x data parallelism (`expert_parallel: N`): the routed experts split over N
ranks (train/parallel/expert_dispatch.py), everything else replicated by DDP or sharded by FSDP2
over all ranks (both told to leave the local experts alone). With LoRA the experts' adapters are
split the same way; with FP8 the local experts run FP8's grouped GEMM.

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
from torch.distributed.tensor import DTensor

from lm.config import CheckpointError, ConfigError
from mm.checkpoint import load_checkpoint, load_state_strict, read_weights
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
        params = dict(model.named_parameters())
        self.local = {n: params[n] for n in self.expert_names if n in params}  # this rank's slices
        self.expert_params = [p for p in self.local.values() if p.requires_grad]
        super().__init__(model, cfg, info, keep_own=tuple(self.expert_names))
        self.lora = cfg.lora

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
        replicated = [p for p in self.parts.parameters() if p.grad is not None and id(p) not in own]
        sharded = norm_squared([p.grad for p in self.expert_params], self.info.device).reshape(1)
        dist.all_reduce(sharded, group=self.groups.ep_group)
        total = (norm_squared([p.grad for p in replicated], self.info.device) + sharded[0]).sqrt()
        if max_norm > 0:
            for params in (replicated, self.expert_params):  # FSDP's DTensor gradients and plain ones apart
                if params:
                    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
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
        full = super().gather_state(opt, sched)  # expert tensors in it, if any, are rank 0's slices
        if self.info.rank >= self.groups.ep_size:  # only the first replica (rank 0's EP group) sends
            return full
        keys = self.optim_keys(full[1]["state"], opt) if full else {}
        for name, p in self.local.items():
            weight = self.gather_experts(p.detach())
            moments = {k: self.gather_experts(v) for k, v in sorted(opt.state.get(p, {}).items())
                       if isinstance(v, torch.Tensor) and v.dim() >= 1}
            if full:
                full[0][name] = weight
                if name in keys:
                    full[1]["state"][keys[name]] = {**full[1]["state"][keys[name]], **moments}
        return full

    def optim_keys(self, state: dict, opt) -> dict:
        """Parameter name -> its key in an optimiser state dict: an index (DDP) or the name (FSDP2's)."""
        names = param_names(opt, self.parts) if not self.fsdp else None
        return {(k if isinstance(k, str) else names[k]): k for k in state}

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
        saved = blob["optimizer"]
        state = dict(saved["state"])
        for name, key in self.optim_keys(state, opt).items():
            if name in self.expert_names:
                state[key] = {k: self.own_slice(v, self.expert_names[name], f"optimiser state of {name}")
                              if isinstance(v, torch.Tensor) and v.dim() >= 1 else v for k, v in state[key].items()}
        super().load_state(weights, dict(blob, optimizer=dict(saved, state=state)), opt, sched, path)

    def own_slice(self, t: torch.Tensor, n_experts: int, what: str) -> torch.Tensor:
        if t.shape[0] != n_experts:
            raise CheckpointError(f"{what}: {t.shape[0]} experts along dim 0, this model has {n_experts} "
                                  f"(a checkpoint of another model?)")
        # a copy, not a view: a view would keep the whole file's tensor (every expert) alive as optimiser state
        return t[self.groups.owned(n_experts)].clone()

    def full_model(self, checkpoint) -> CaptionModel:
        """The whole model, for export and saved adapters, from the last (gathered) checkpoint: with
        LoRA, a fresh model given this run's adapters, trainable where this rank's model is."""
        if not self.lora.enabled:
            return load_checkpoint(checkpoint)[0]
        from train.lora import apply_lora

        cfg = self.parts.cfg
        model = CaptionModel(cfg.replace(vision=cfg.vision.replace(pretrained=False, pretrained_file="")),
                             image_token_id=self.parts.image_token_id)
        model.cfg = cfg
        apply_lora(model, self.lora)
        path = Path(checkpoint) / "model.safetensors"
        load_state_strict(model, read_weights(path), str(path))
        trains = {n: p.requires_grad for n, p in self.parts.named_parameters()}
        for n, p in model.named_parameters():
            p.requires_grad_(trains.get(n, False))
        return model


def norm_squared(grads: list[torch.Tensor], device) -> torch.Tensor:
    """The squared 2-norm of gradients, whole (FSDP2's sharded DTensor norms are reduced first)."""
    if not grads:
        return torch.zeros((), device=device)
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    return total.float().square()
