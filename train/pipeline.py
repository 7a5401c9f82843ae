"""Pipeline x data parallel training with torch.distributed.pipelining's schedules.

Under one `torchrun`, world = pipeline.stages x data-parallel replicas, laid out as a
(pp, dp) grid with pp outermost (torchtitan's order: the point-to-point traffic
of the pipeline is small, the gradient all-reduce of the replicas is not, so replicas
should share a node). Every rank of a pipeline reads the same batches (the data stream
is split by dp rank only). The schedule comes from PyTorch (GPipe, 1F1B, interleaved
1F1B, ZB-V, DualPipeV); train/pipeline_stages.py cuts the model and normalises the loss
so that one optimiser step equals the unpipelined trainer's step on the same batch.

After the schedule: gradients are averaged over the stage's dp group (one flat
all-reduce), clipped by the norm over *all* stages (squared norms summed over the pp
group), the optimiser steps, and each rank moves its MoE router biases with loads
summed over its dp group. Checkpoints are ordinary trainer checkpoints: rank 0 gathers
the weights and the optimiser state by parameter name, so a pipelined run resumes
from, and is resumed by, an unpipelined one (with any pipeline layout).

Every rank builds the whole model from the same seed and keeps its stages; a model
that does not fit one host's memory would need meta-device construction instead.
Shapes: a stage's receive buffers are sized on its first microbatch, so a schedule is
built per (microbatch size, sequence length); fixed `data.pad_to` lengths keep that to
one per task.
"""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage

import lm
from lm.config import ConfigError
from mm.model import CaptionModel
from mm.tokenizer import Tokenizer
from train import dist as D
from train import pipeline_checkpoint as C
from train import trainer as T
from train.checkpoints import latest_checkpoint, resume_from
from train.config import TrainConfig
from train.metrics_log import RunLog
from train.pipeline_stages import (
    SCHEDULES,
    MicrobatchLoss,
    RankParts,
    Stage,
    rank_stages,
    split_layers,
    stages_per_rank,
)


@dataclass
class Grid:
    """This rank's place in the (pp, dp) grid."""

    info: D.DistInfo
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup

    @property
    def data_info(self) -> D.DistInfo:
        """What the data stream and the throughput log see: one reader per replica."""
        return replace(self.info, rank=self.dp_rank, world_size=self.dp_size)


def make_grid(info: D.DistInfo, stages: int) -> Grid:
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


class Pipeline:
    """One rank's share of a pipelined CaptionModel: its stages, their `parts` (the module
    the optimiser and checkpoints see) and a schedule per input shape."""

    def __init__(self, model: CaptionModel, cfg: TrainConfig, grid: Grid):
        pc, lm_cfg = cfg.pipeline, model.cfg.lm
        if lm_cfg.tie_word_embeddings:
            raise ValueError("pipeline parallelism needs untied embeddings (the head lives on the last stage, "
                             "the embedding on the first); set model.lm.tie_word_embeddings=false")
        self.cfg, self.grid = cfg, grid
        ranges = split_layers(lm_cfg.num_hidden_layers, grid.pp_size, pc.schedule)
        self.num_stages, self.stage_ids = len(ranges), rank_stages(pc.schedule, grid.pp_rank, grid.pp_size)
        autocast = T.AUTOCAST[cfg.precision]
        self.stages = [Stage(model, ranges[i], i == 0, i == self.num_stages - 1, autocast) for i in self.stage_ids]
        self.parts = RankParts(model, self.stages, [j for i in self.stage_ids for j in ranges[i]])
        self.loss = MicrobatchLoss(lm_cfg)
        # The full model's optimiser layout and MoE order, by name: checkpoints store both.
        name_of = {id(p): n for n, p in model.named_parameters()}
        self.full_groups = [[name_of[id(p)] for p in g["params"]] for g in T.param_groups(model, cfg)]
        self.moe_names = [n for n, m in model.named_modules() if isinstance(m, lm.moe.MoE)]
        self.first, self.last = 0 in self.stage_ids, self.num_stages - 1 in self.stage_ids
        self._schedules = {}

    def schedule(self, key: tuple):
        """The schedule for one microbatch shape (built on first use, on every pp rank alike)."""
        if key not in self._schedules:
            if len(self._schedules) == 8:
                warnings.warn("pipeline: more than 8 batch shapes so far, each with its own schedule and buffers; "
                              "set data.pad_to to fixed lengths per task", stacklevel=2)
            device = self.grid.info.device
            stages = [PipelineStage(s, i, self.num_stages, device, group=self.grid.pp_group)
                      for s, i in zip(self.stages, self.stage_ids)]
            cls = SCHEDULES[self.cfg.pipeline.schedule]
            self._schedules[key] = cls(stages if stages_per_rank(self.cfg.pipeline.schedule) > 1 else stages[0],
                                       n_microbatches=self.cfg.pipeline.microbatches, loss_fn=self.loss,
                                       scale_grads=False)
        return self._schedules[key]

    def run(self, batch: dict, scale: float = 1.0, backward: bool = True) -> torch.Tensor:
        """One batch through the pipeline; (main, mtp, aux) of the batch on the last stage, zeros elsewhere."""
        n, device = self.cfg.pipeline.microbatches, self.grid.info.device
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
        return self.loss.totals(n) if self.last else torch.zeros(3, device=device)

    def reduce_and_clip(self, max_norm: float) -> float:
        """Average gradients over the dp group, clip by the norm over every stage; returns that norm."""
        params = [p for p in self.parts.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        if self.grid.dp_size > 1 and grads:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.grid.dp_group)
            flat /= self.grid.dp_size
            for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(r)
        local = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.grid.info.device)
        squared = local.double().square().reshape(1)
        dist.all_reduce(squared, group=self.grid.pp_group)
        total = squared.sqrt()[0]
        if max_norm > 0 and params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(grads[0].dtype))
        return float(total)

    def update_router_bias(self) -> tuple[torch.Tensor, list[float]]:
        """Bias step of this rank's MoE layers (loads summed over the dp group). Returns this
        replica's loads [L, E] and each layer's max/mean load, over the whole pipeline in model order."""
        layers = {n: m for n, m in self.parts.named_modules() if isinstance(m, lm.moe.MoE)}
        loads = {n: m.load.float().cpu().clone() for n, m in layers.items()}  # zeroed by the update
        ratios = dict(zip(layers, lm.update_router_bias(self.parts, group=self.grid.dp_group)))
        everyone = [None] * self.grid.pp_size
        dist.all_gather_object(everyone, (loads, ratios), group=self.grid.pp_group)
        loads = {k: v for d, _ in everyone for k, v in d.items()}
        ratios = {k: v for _, d in everyone for k, v in d.items()}
        names = [n for n in self.moe_names if n in loads]
        return (torch.stack([loads[n] for n in names]) if names else None), [ratios[n] for n in names]


def train_step(pipe: Pipeline, opt, sched, stream, cfg: TrainConfig) -> dict:
    """trainer.train_step for a pipeline: grad_accum batches, each split into microbatches."""
    opt.zero_grad(set_to_none=True)
    sums = torch.zeros(3, dtype=torch.float64, device=pipe.grid.info.device)
    tokens = images = 0
    for _ in range(cfg.optim.grad_accum):
        batch = stream.next()
        sums += pipe.run(batch, scale=1.0 / cfg.optim.grad_accum).double() / cfg.optim.grad_accum
        tokens += int(batch["attention_mask"].sum())
        images += batch["images"].shape[0]
    # Only last stages hold losses: the sum over all ranks / dp is the mean over replicas,
    # and a non-finite loss anywhere makes every rank skip the step together.
    dist.all_reduce(sums)
    sums /= pipe.grid.dp_size
    stats = {f"loss_{k}": float(v) for k, v in zip(("main", "mtp", "aux"), sums)}
    stats |= {"tokens": tokens, "images": images}
    if not bool(torch.isfinite(sums).all()):
        opt.zero_grad(set_to_none=True)
        sched.step()
        return stats | {"skipped": True}
    stats["grad_norm"] = pipe.reduce_and_clip(cfg.optim.grad_clip)
    opt.step()
    sched.step()
    stats["load"], stats["load_max_over_mean"] = pipe.update_router_bias()
    return stats | {"skipped": False}


@torch.no_grad()
def evaluate(pipe: Pipeline, cfg: TrainConfig, tokenizer, transform, num_image_tokens: int) -> float:
    """trainer.evaluate through the pipeline (forward only): mean main loss over eval_batches."""
    if not cfg.data.val:
        return float("nan")
    pipe.parts.eval()
    stream = T.DataStream(cfg, cfg.data.val, tokenizer, num_image_tokens, transform, pipe.grid.data_info,
                          resampled=False, num_workers=0)
    total, count = torch.zeros(2, dtype=torch.float64), 0
    while count < cfg.eval_batches and (batch := stream.next(stop_at_epoch_end=True)) is not None:
        total[0] += float(pipe.run(batch, backward=False)[0])
        count += 1
    pipe.parts.train()
    total[1] = count if pipe.last else 0
    dist.all_reduce(total)  # last stages of every replica; count is the same on all of them
    return float(total[0] / total[1].clamp(min=1))


def check_supported(cfg: TrainConfig) -> None:
    if cfg.parallel != "ddp":
        raise ConfigError(f"parallel={cfg.parallel!r} with pipeline.stages={cfg.pipeline.stages}: the replicas of "
                          "a pipeline are data parallel (parallel=ddp); FSDP inside a pipeline is not supported")
    if cfg.compile:
        raise ConfigError("compile=true is not supported with pipeline.stages > 1 (zbv and dualpipev split the "
                          "backward into input and weight parts, which torch.compile does not); set compile=false")
    if cfg.optim.batch_size % cfg.pipeline.microbatches:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} does not split into pipeline.microbatches="
                          f"{cfg.pipeline.microbatches} equal microbatches; use a multiple of {cfg.pipeline.microbatches}")


def train(cfg: TrainConfig, resume: str | None = None, export: str | None = None,
          model: CaptionModel | None = None, tokenizer: Tokenizer | None = None) -> Path:
    """trainer.train with the model cut into pipeline stages; returns the final checkpoint directory."""
    check_supported(cfg)
    info = D.setup()
    grid = make_grid(info, cfg.pipeline.stages)
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    say = (lambda m: T.tqdm.write(m)) if info.is_main else (lambda m: None)
    tokenizer = tokenizer or T.build_tokenizer(cfg, info, out_dir, say)
    model = model or T.build_model(cfg, tokenizer)
    candidates = T.resume_point(model, cfg, info, resume, say)
    # device, channels_last and FP8 as the trainer does; no DDP wrapping (single-process info)
    model = T.prepare(model, cfg, D.DistInfo(device=info.device), log=say)
    transform, n_image = T.image_transform(model), model.num_image_tokens
    T._describe(model, say)
    pipe = Pipeline(model, cfg, grid)
    del model  # each rank keeps only its stages' modules alive
    say(f"pipeline: {grid.pp_size} ranks x {grid.dp_size} replicas, {cfg.pipeline.schedule}, "
        f"{cfg.pipeline.microbatches} microbatches; this rank runs stages {pipe.stage_ids}")
    opt, sched = T.build_optimizer(pipe.parts, cfg)
    state = T.fresh_state()
    if candidates:
        ckpt, state = resume_from(candidates, lambda p: C.load(pipe, p, opt, sched), say)
        say(f"resumed from {ckpt} at step {state['step']}")
    stream = T.DataStream(cfg, cfg.data.train, tokenizer, n_image, transform, grid.data_info,
                          position=state["data"], augment=True)
    runlog = RunLog(out_dir, info.is_main, cfg.tensorboard)
    runlog.start_at(state["step"])
    pipe.parts.train()
    t0, last = time.perf_counter(), None
    while state["step"] < cfg.optim.max_steps:
        stats = train_step(pipe, opt, sched, stream, cfg)
        T.count_step(state, stats, stream)
        if state["bad_steps"] >= cfg.max_bad_steps:
            last = C.save(pipe, tokenizer, opt, sched, state, cfg, runlog)
            raise T.TrainingStopped(f"{state['bad_steps']} consecutive steps had a non-finite loss (step "
                                    f"{state['step']}); the last good weights are saved in {last}. Lower optim.lr.")
        if state["step"] % cfg.log_every == 0 or state["step"] == cfg.optim.max_steps:
            record = T._log_record(state["log_window"], time.perf_counter() - t0, state, sched, stream,
                                   grid.data_info)
            if cfg.eval_every and state["step"] % cfg.eval_every == 0:
                record["val_loss"] = evaluate(pipe, cfg, tokenizer, transform, n_image)
            runlog.write(record)
            say(f"step {state['step']}: loss {record['loss_main']:.4f}, {record['tokens_per_s']:.0f} tok/s")
            state["log_window"], t0 = [], time.perf_counter()
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.optim.max_steps:
            last = C.save(pipe, tokenizer, opt, sched, state, cfg, runlog)
    if export:
        _export(pipe, tokenizer, export, cfg, state, last)
    D.barrier(info)
    return last or latest_checkpoint(out_dir)


def _export(pipe: Pipeline, tokenizer, export: str, cfg: TrainConfig, state: dict, last: Path | None) -> None:
    """A bf16 Captioner directory made from the last saved (gathered) checkpoint, by rank 0."""
    if pipe.grid.info.is_main:
        from mm.checkpoint import load_checkpoint
        from train.checkpoints import export_model

        full, _ = load_checkpoint(last or latest_checkpoint(cfg.out_dir))
        T.tqdm.write(f"exported {export_model(full, tokenizer, export, cfg, state)}")
