"""Pipeline x data parallel training with torch.distributed.pipelining's schedules.

Under one `torchrun`, world = pipeline.stages x data-parallel replicas, laid out as a
(pp, dp) grid with pp outermost (torchtitan's order: the point-to-point traffic
of the pipeline is small, the gradient all-reduce of the replicas is not, so replicas
should share a node). Every rank of a pipeline reads the same batches (the data stream
is split by dp rank only). The schedule comes from PyTorch (GPipe, 1F1B, interleaved
1F1B, ZB-V, DualPipeV); train/parallel/stages.py cuts the model and normalises the loss
so that one optimiser step equals the unpipelined step on the same batch. The training
loop is train/trainer.py's, the same as for plain, DDP and FSDP runs: this module gives it
the rank's parts, a forward-backward, the gradient reduction and the checkpoint state.

After the schedule: gradients are averaged over the stage's dp group (one flat
all-reduce), clipped by the norm over *all* stages (squared norms summed over the pp
group), the optimiser steps, and each rank moves its MoE router biases with loads
summed over its dp group. Checkpoints are ordinary training checkpoints: rank 0 gathers
the weights and the optimiser state by parameter name, so a pipelined run resumes
from, and is resumed by, an unpipelined one (with any pipeline layout).

Expert parallelism (`expert_parallel: N`) runs inside each stage's dp group
(train/parallel/expert_parallel.py): the routed experts split over N of its ranks, their
gradients averaged over the stage's ranks that hold the same experts, their squared norms
summed over the EP group before the pp group, and the checkpoint gather takes them from the
first replica's EP group. The ranks of an EP group sit at the same pipeline position, so they
run the same schedule and issue the same all-to-alls in the same order, whichever half of a
split backward (zbv, dualpipev) the all-to-all's backward lands in: the input half on later
stages, the weight half on stage 0, where the schedule runs the whole backward.

Every rank builds the whole model from the same seed and keeps its stages; a model
that does not fit one host's memory would need meta-device construction instead.
Shapes: a stage's receive buffers are sized on its first microbatch, so a schedule is
built per (microbatch size, sequence length); fixed `data.pad_to` lengths keep that to
one per task (under expert parallelism a new shape on any rank rebuilds every rank's schedule).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage

import lm
from lm.config import ConfigError
from mm.checkpoint import load_checkpoint, load_state_strict
from mm.model import CaptionModel
from train.config import TrainConfig
from train.optim import param_groups
from train.parallel import gather as G
from train.parallel.dist import DistInfo
from train.parallel.expert_dispatch import make_expert_groups
from train.parallel.expert_parallel import ExpertShards, any_rank, describe_experts
from train.parallel.router import balance_routers
from train.parallel.stages import (
    SCHEDULES,
    V_SHAPED,
    MicrobatchLoss,
    RankParts,
    Stage,
    rank_stages,
    split_layers,
    stages_per_rank,
)
from train.state import STATE_FILE


@dataclass
class Grid:
    """This rank's place in the (pp, dp) grid."""

    info: DistInfo
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup

    @property
    def data_info(self) -> DistInfo:
        """What the data stream and the throughput log see: one reader per replica."""
        return replace(self.info, rank=self.dp_rank, world_size=self.dp_size)


def make_grid(info: DistInfo, stages: int) -> Grid:
    """Process groups of the (pp, dp) layout: rank = pp_rank * dp_size + dp_rank."""
    if not dist.is_initialized() or info.world_size % stages:
        raise ValueError(f"pipeline.stages={stages} needs a torchrun world that is a multiple of it "
                         f"(world size {info.world_size}); launch with --nproc_per_node")
    dp = info.world_size // stages
    # Plain new_group rather than a DeviceMesh: on gloo, DeviceMesh's subgroups sometimes abort
    # the process at exit ("terminate called without an active exception").
    pp_groups = [dist.new_group([p * dp + d for p in range(stages)]) for d in range(dp)]
    dp_groups = [dist.new_group([p * dp + d for d in range(dp)]) for p in range(stages)]
    pp_rank, dp_rank = divmod(info.rank, dp)
    return Grid(info, pp_rank, stages, dp_rank, dp, pp_groups[dp_rank], dp_groups[pp_rank])


def check_supported(cfg: TrainConfig) -> None:
    if cfg.parallel != "ddp":
        raise ConfigError(f"parallel={cfg.parallel!r} with pipeline.stages={cfg.pipeline.stages}: the replicas of "
                          "a pipeline are data parallel (parallel=ddp); FSDP inside a pipeline is not supported")
    if cfg.compile:
        raise ConfigError("compile=true is not supported with pipeline.stages > 1 (zbv and dualpipev split the "
                          "backward into input and weight parts, which torch.compile does not); set compile=false")
    if cfg.pipeline.schedule in V_SHAPED and cfg.eval_every and cfg.data.val:
        # torch's forward-only run of the V schedules replays their training order, backward
        # steps included, and fails mid-run (torch 2.14: "can't steal_bwd_input if this stage
        # doesn't have backward"): refused before the first step rather than at the first evaluation
        raise ConfigError(f"validation (eval_every={cfg.eval_every} with data.val) does not run under "
                          f"pipeline.schedule={cfg.pipeline.schedule!r}; use gpipe, 1f1b or interleaved1f1b, "
                          "or set eval_every=0 and evaluate the checkpoints with `mm eval`")
    if cfg.optim.batch_size % cfg.pipeline.microbatches:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} does not split into pipeline.microbatches="
                          f"{cfg.pipeline.microbatches} equal microbatches; use a multiple of {cfg.pipeline.microbatches}")


class PipelineParallel:
    """One rank's share of a pipelined CaptionModel: its stages, their `parts` (the module the
    optimiser and checkpoints see) and a schedule per input shape. The caller drops its own
    reference to the model afterwards, so each rank keeps only its stages' modules alive."""

    pipelined = True

    def __init__(self, model: CaptionModel, cfg: TrainConfig, grid: Grid):
        pc, lm_cfg = cfg.pipeline, model.cfg.lm
        if lm_cfg.tie_word_embeddings:
            raise ValueError("pipeline parallelism needs untied embeddings (the head lives on the last stage, "
                             "the embedding on the first); set model.lm.tie_word_embeddings=false")
        self.cfg, self.grid, self.info, self.model_cfg = cfg, grid, grid.info, model.cfg
        self.experts = None
        if cfg.expert_parallel > 1:
            groups = make_expert_groups(grid.info, cfg.expert_parallel, grid.pp_size)
            self.experts = ExpertShards(model, groups)  # before the stages: they hold the sharded layers
        self.data_info, self.dp_size = grid.data_info, grid.dp_size
        ranges = split_layers(lm_cfg.num_hidden_layers, grid.pp_size, pc.schedule)
        self.num_stages, self.stage_ids = len(ranges), rank_stages(pc.schedule, grid.pp_rank, grid.pp_size)
        self.stages = [Stage(model, ranges[i], i == 0, i == self.num_stages - 1, cfg.autocast_dtype)
                       for i in self.stage_ids]
        self.parts = RankParts(model, self.stages, [j for i in self.stage_ids for j in ranges[i]])
        if self.experts:
            self.experts.hold(self.parts)
        self.loss = MicrobatchLoss(lm_cfg)
        # The full model's optimiser layout and MoE order, by name: checkpoints store both.
        name_of = {id(p): n for n, p in model.named_parameters()}
        self.full_groups = [[name_of[id(p)] for p in g["params"]] for g in param_groups(model, cfg)]
        self.moe_names = [n for n, m in model.named_modules() if isinstance(m, lm.moe.MoE)]
        self.first, self.last = 0 in self.stage_ids, self.num_stages - 1 in self.stage_ids
        self.holds_loss = self.last
        self._schedules = {}

    def describe(self) -> str:
        text = (f"pipeline: {self.grid.pp_size} ranks x {self.dp_size} replicas, {self.cfg.pipeline.schedule}, "
                f"{self.cfg.pipeline.microbatches} microbatches; this rank runs stages {self.stage_ids}")
        if self.experts:
            text += f"; {describe_experts(self.experts)} (within each stage's replicas)"
        return text

    def train(self, mode: bool = True) -> None:
        self.parts.train(mode)

    def schedule(self, key: tuple):
        """The schedule for one microbatch shape (built on first use, on every pp rank alike)."""
        new = key not in self._schedules
        if self.experts:
            # A new schedule infers its stages' shapes by a real forward and backward, all-to-alls
            # included; the replicas of an EP group read batches of other shapes, so when one rank
            # needs a new schedule every rank builds one for its shape, and the all-to-alls pair up.
            new = any_rank(new, self.info.device)
        if new:
            if len(self._schedules) == 8:
                warnings.warn("pipeline: more than 8 batch shapes so far, each with its own schedule and buffers; "
                              "set data.pad_to to fixed lengths per task", stacklevel=2)
            stages = [PipelineStage(s, i, self.num_stages, self.info.device, group=self.grid.pp_group)
                      for s, i in zip(self.stages, self.stage_ids)]
            cls = SCHEDULES[self.cfg.pipeline.schedule]
            self._schedules[key] = cls(stages if stages_per_rank(self.cfg.pipeline.schedule) > 1 else stages[0],
                                       n_microbatches=self.cfg.pipeline.microbatches, loss_fn=self.loss,
                                       scale_grads=False)
        return self._schedules[key]

    def run(self, batch: dict, scale: float = 1.0, backward: bool = True) -> torch.Tensor:
        """One batch through the pipeline: (loss, main, mtp, aux) of the batch on the last stage,
        zeros elsewhere; with `backward`, gradients scaled by `scale` accumulate in the parts."""
        n, device = self.cfg.pipeline.microbatches, self.info.device
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        if ids.shape[0] % n:
            raise ValueError(f"a batch of {ids.shape[0]} does not split into pipeline.microbatches={n} "
                             f"equal microbatches; make optim.batch_size a multiple of {n}")
        args = [()] * n  # only the first stage takes root inputs
        if self.first:
            images = batch["images"].to(device)
            if self.cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            args = list(zip(images.tensor_split(n), ids.tensor_split(n)))
        kwargs = [{"attention_mask": m} for m in mask.tensor_split(n)]
        targets = list(labels.tensor_split(n)) if self.last else None
        self.loss.start(labels, scale)
        schedule = self.schedule((ids.shape[0] // n, ids.shape[1], backward))
        run = schedule.step if backward else schedule.eval
        run(arg_mbs=args, kwarg_mbs=kwargs, target_mbs=targets, return_outputs=False)
        return self.loss.totals(n) if self.last else torch.zeros(4, device=device)

    def stop_together(self, done: bool) -> bool:
        """Whether a loop over batches ends here: a pipeline's ranks read the same batches, so agree;
        with expert parallelism the replicas of an EP group read different ones, so all ranks agree."""
        if self.experts:
            return any_rank(done, self.info.device)
        return done

    def clip_grads(self, max_norm: float) -> float:
        """Average gradients over the dp group (experts: over their replica group), clip by the norm
        over every stage; returns that norm."""
        own = set()
        if self.experts:
            self.experts.reduce_grads()
            own = {id(p) for p in self.experts.params}
        params = [p for p in self.parts.parameters() if p.grad is not None]
        grads = [p.grad for p in params if id(p) not in own]
        if self.grid.dp_size > 1 and grads:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.grid.dp_group)
            flat /= self.grid.dp_size
            for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(r)
        local = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.info.device)
        squared = local.double().square().reshape(1)
        if self.experts:
            squared += self.experts.norm_squared(self.info.device).double()
        dist.all_reduce(squared, group=self.grid.pp_group)
        total = squared.sqrt()[0]
        if max_norm > 0 and params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(params[0].grad.dtype))
        return float(total)

    def balance_routers(self) -> tuple[torch.Tensor | None, list[float]]:
        """Bias step of this rank's MoE layers (loads summed over the dp group). Returns this
        replica's loads [L, E] and each layer's max/mean load, over the whole pipeline in model order."""
        names = [n for n, m in self.parts.named_modules() if isinstance(m, lm.moe.MoE)]
        loads, ratios = balance_routers(self.parts, self.info, self.grid.dp_group)
        mine = ({n: x.cpu() for n, x in zip(names, loads)} if names else {}), dict(zip(names, ratios))
        everyone = [None] * self.grid.pp_size
        dist.all_gather_object(everyone, mine, group=self.grid.pp_group)
        loads = {k: v for d, _ in everyone for k, v in d.items()}
        ratios = {k: v for _, d in everyone for k, v in d.items()}
        names = [n for n in self.moe_names if n in loads]
        return (torch.stack([loads[n] for n in names]) if names else None), [ratios[n] for n in names]

    def gather_state(self, opt, sched) -> tuple[dict, dict, dict] | None:
        """(weights, optimiser state, scheduler state) of the whole model on rank 0, as an unpipelined
        run would have them; None on the other ranks."""
        grid = self.grid
        experts = self.experts.gather(opt) if self.experts else {}  # from the first replica's EP group
        if grid.dp_rank == 0:
            mine = {"weights": {k: v.detach().cpu() for k, v in self.parts.state_dict().items()},
                    "optim": G.named_optim_state(opt, self.parts), "sched": sched.state_dict()}
            for name, (weight, moments) in experts.items():
                mine["weights"][name] = weight
                if name in mine["optim"]["state"]:
                    mine["optim"]["state"][name] = {**mine["optim"]["state"][name], **moments}
            pieces = [None] * grid.pp_size if grid.info.is_main else None
            dist.gather_object(mine, pieces, group=grid.pp_group, group_dst=0)
        if not grid.info.is_main:
            return None
        weights = {k: v for piece in pieces for k, v in piece["weights"].items()}
        return (weights, G.full_optim_state([p["optim"] for p in pieces], self.full_groups),
                G.full_sched_state(pieces, self.full_groups))

    def load_state(self, weights: dict, blob: dict, opt, sched, path: Path) -> None:
        """This rank's weights and optimiser share, and the scheduler, from a whole-model checkpoint."""
        saved = blob["optimizer"]
        if self.experts:
            flat = [n for names in self.full_groups for n in names]
            weights, state = self.experts.slice_state(weights, saved["state"], dict(enumerate(flat)), path)
            saved = dict(saved, state=state)
        own = self.parts.state_dict()
        load_state_strict(self.parts, {k: v for k, v in weights.items() if k in own}, str(path / "model.safetensors"))
        G.load_optim_state(opt, self.parts, saved, self.full_groups, str(path / STATE_FILE))
        G.load_sched_state(sched, opt, self.parts, blob["scheduler"], self.full_groups)

    def full_model(self, checkpoint) -> CaptionModel:
        """The whole model, for export: read back from the last (gathered) checkpoint."""
        return load_checkpoint(checkpoint)[0]
