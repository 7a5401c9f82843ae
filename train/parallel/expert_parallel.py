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
from torch import nn
from torch.distributed.tensor import DTensor

from lm.config import CheckpointError, ConfigError
from mm.checkpoint import load_checkpoint, load_state_strict, read_weights
from mm.model import CaptionModel
from train.config import TrainConfig
from train.parallel.data_parallel import DataParallel
from train.parallel.dist import DistInfo
from train.parallel.expert_dispatch import ExpertGroups, make_expert_groups, shard_experts
from train.parallel.gather import param_names


def check_world(cfg: TrainConfig, info: DistInfo) -> None:
    """What only the launch can tell: the EP degree must divide the data-parallel ranks (the torchrun
    world, or each pipeline stage's share of it)."""
    n, stages = cfg.expert_parallel, cfg.pipeline.stages
    dp = info.world_size // stages
    if n > 1 and (info.world_size % stages or dp % n):
        where = (f"the world size {info.world_size}" if stages == 1 else
                 f"the data-parallel ranks of each pipeline stage (world size {info.world_size} / "
                 f"pipeline.stages={stages})")
        raise ConfigError(f"expert_parallel={n} does not divide {where}; launch torchrun with a multiple of "
                          f"{n * stages} processes (--nproc_per_node x --nnodes)")


class ExpertShards:
    """A rank's local experts and what the loop does with them apart from the other parameters:
    gradients reduced over the replica group, norms summed over the EP group, checkpoints gathered
    from and sliced into the EP group. Shared by ExpertParallel and the pipeline (`held`: the module
    whose parameters this rank trains, the model itself or a pipeline rank's parts)."""

    def __init__(self, model: nn.Module, groups: ExpertGroups):
        self.groups = groups
        self.names = shard_experts(model, groups)  # name -> global experts along dim 0
        self.hold(model)

    def hold(self, held: nn.Module) -> None:
        """Train the local experts of `held` (under the model's names): the model or a pipeline rank's parts."""
        params = dict(held.named_parameters())
        self.local = {n: params[n] for n in self.names if n in params}  # this rank's slices
        self.params = [p for p in self.local.values() if p.requires_grad]

    def reduce_grads(self) -> None:
        """Sum over the replica group / dp size: DDP's mean over all ranks' tokens (see the docstring)."""
        for p in self.params:
            if p.grad is None:  # every rank takes part in the all-reduce, used or not
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.groups.replica_group)
        flat /= self.groups.dp_size
        for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(r)

    def norm_squared(self, device) -> torch.Tensor:
        """The squared norm of the EP group's expert gradients: every expert of the held layers once."""
        squared = norm_squared([p.grad for p in self.params], device).reshape(1)
        dist.all_reduce(squared, group=self.groups.ep_group)
        return squared[0]

    def gather(self, opt) -> dict[str, tuple[torch.Tensor, dict]]:
        """Name -> (every expert's weights, their optimiser moments) on EP rank 0 of the first replica,
        one tensor at a time; {} elsewhere (the other ranks of the first replica send their slices)."""
        if self.groups.replica:
            return {}
        out = {}
        for name, p in self.local.items():
            weight = self.gather_experts(p.detach())
            moments = {k: self.gather_experts(v) for k, v in sorted(opt.state.get(p, {}).items())
                       if isinstance(v, torch.Tensor) and v.dim() >= 1}
            out[name] = (weight, moments)
        return out if self.groups.ep_rank == 0 else {}

    def gather_experts(self, t: torch.Tensor) -> torch.Tensor:
        """Every EP rank's slice of one expert tensor, concatenated on EP rank 0 (the others get theirs back)."""
        first = self.groups.ep_rank == 0
        parts = [torch.empty_like(t) for _ in range(self.groups.ep_size)] if first else None
        dist.gather(t.contiguous(), parts, group=self.groups.ep_group, group_dst=0)
        return torch.cat(parts).cpu() if first else t

    def slice_state(self, weights: dict, state: dict, name_of: dict, path: Path) -> tuple[dict, dict]:
        """This rank's slices of a global checkpoint's expert tensors (`weights`) and of their optimiser
        state (`state`, keyed as the saved optimiser keys it; `name_of`: key -> parameter name)."""
        weights, state = dict(weights), dict(state)
        for name, n in self.names.items():
            if name in weights:
                weights[name] = self.own_slice(weights[name], n, f"{path / 'model.safetensors'}: {name}")
        for key, entry in state.items():
            name = name_of.get(key)
            if name in self.names:
                state[key] = {k: self.own_slice(v, self.names[name], f"optimiser state of {name}")
                              if isinstance(v, torch.Tensor) and v.dim() >= 1 else v for k, v in entry.items()}
        return weights, state

    def own_slice(self, t: torch.Tensor, n_experts: int, what: str) -> torch.Tensor:
        if t.shape[0] != n_experts:
            raise CheckpointError(f"{what}: {t.shape[0]} experts along dim 0, this model has {n_experts} "
                                  f"(a checkpoint of another model?)")
        # a copy, not a view: a view would keep the whole file's tensor (every expert) alive as optimiser state
        return t[self.groups.owned(n_experts)].clone()


def any_rank(done: bool, device) -> bool:
    """Whether any rank is done: every forward is a collective of the EP group, so a loop over
    batches (the validation loss) ends on every rank as soon as one rank has no batch left."""
    flag = torch.tensor([float(done)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag[0])


class ExpertParallel(DataParallel):
    def __init__(self, model: CaptionModel, cfg: TrainConfig, info: DistInfo):
        self.experts = ExpertShards(model, make_expert_groups(info, cfg.expert_parallel))
        self.groups, self.expert_names = self.experts.groups, self.experts.names
        super().__init__(model, cfg, info, keep_own=tuple(self.expert_names))
        self.lora = cfg.lora

    def describe(self) -> str:
        return f"{super().describe()}; {describe_experts(self.experts)}"

    def stop_together(self, done: bool) -> bool:
        return any_rank(done, self.info.device)

    def clip_grads(self, max_norm: float) -> float:
        """Reduce the expert gradients over their replica group, clip by the norm of the whole model."""
        self.experts.reduce_grads()
        own = {id(p) for p in self.experts.params}
        replicated = [p for p in self.parts.parameters() if p.grad is not None and id(p) not in own]
        sharded = self.experts.norm_squared(self.info.device)
        total = (norm_squared([p.grad for p in replicated], self.info.device) + sharded).sqrt()
        if max_norm > 0:
            for params in (replicated, self.experts.params):  # FSDP's DTensor gradients and plain ones apart
                if params:
                    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)

    def gather_state(self, opt, sched) -> tuple[dict, dict, dict] | None:
        """(weights, optimiser state, scheduler state) in the global layout on rank 0, None elsewhere."""
        full = super().gather_state(opt, sched)  # expert tensors in it, if any, are rank 0's slices
        gathered = self.experts.gather(opt)  # rank 0's EP group sends, rank 0 receives
        if full:
            keys = self.optim_keys(full[1]["state"], opt)
            for name, (weight, moments) in gathered.items():
                full[0][name] = weight
                if name in keys:
                    full[1]["state"][keys[name]] = {**full[1]["state"][keys[name]], **moments}
        return full

    def optim_keys(self, state: dict, opt) -> dict:
        """Parameter name -> its key in an optimiser state dict: an index (DDP) or the name (FSDP2's)."""
        names = param_names(opt, self.parts) if not self.fsdp else None
        return {(k if isinstance(k, str) else names[k]): k for k in state}

    def load_state(self, weights: dict, blob: dict, opt, sched, path: Path) -> None:
        """This rank's slices of the global checkpoint's expert tensors and their optimiser state."""
        saved = blob["optimizer"]
        name_of = {k: n for n, k in self.optim_keys(saved["state"], opt).items()}
        weights, state = self.experts.slice_state(weights, saved["state"], name_of, path)
        super().load_state(weights, dict(blob, optimizer=dict(saved, state=state)), opt, sched, path)

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


def describe_experts(experts: ExpertShards) -> str:
    g = experts.groups
    return (f"expert parallel: {g.ep_size} ranks per EP group, {g.replicas} replica(s) of each expert, "
            f"{len(experts.names)} expert tensors sharded")


def norm_squared(grads: list[torch.Tensor], device) -> torch.Tensor:
    """The squared 2-norm of gradients, whole (FSDP2's sharded DTensor norms are reduced first)."""
    if not grads:
        return torch.zeros((), device=device)
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    return total.float().square()
