"""The trainer: one loop for a toy run on a CPU and for `torchrun` on many GPUs, whatever the parallelism.

Reading order: `parallelize`, `forward_loss`, `forward_backward`, `train_step`, `validation_loss`,
`train`, `run_steps` (what a run is built from is train/build.py). The parallelism builds the
model parts (train/parallel/: a single process, DDP, FSDP2, or pipeline x data parallel); the
loop does not fork: `forward_backward` branches once on whether a pipeline runs the batch
(torchtitan's shape), and the loss reduction, the bad-step policy, gradient clip, optimiser
step and router-bias step (auxiliary-loss-free balancing, the load summed over data-parallel
ranks) are the same for every parallelism. A resumed run continues bit-for-bit: the data
position is (epoch, batch in epoch), each epoch's order a function of (seed, epoch, rank), and
the run state (train/state.py), optimiser, scheduler and RNG travel in `train_state/`.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mm.model import CaptionModel
from mm.tokenizer import Tokenizer
from train.build import (
    build_model,
    build_tokenizer,
    check_runnable,
    describe,
    prepare,
    resume_point,
    stream_opener,
)
from train.checkpoints import export_model, latest_checkpoint, load_train_state, resume_from, save
from train.config import TrainConfig
from train.optim import build_optimizer
from train.parallel import dist as D
from train.parallel.data_parallel import DataParallel
from train.runlog import RunLog, log_record
from train.state import RunState


class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite losses: the run stops instead of drifting."""


def parallelize(model: CaptionModel, cfg: TrainConfig, info: D.DistInfo):
    """The parallelism that runs `model`: pipeline x data parallel (with expert parallelism inside each
    stage's replicas when asked), expert x data parallel, or data parallel (DDP/FSDP2, or none)."""
    if cfg.pipeline.stages > 1:
        from train.parallel.pipeline import PipelineParallel, make_grid

        return PipelineParallel(model, cfg, make_grid(info, cfg.pipeline.stages))
    if cfg.expert_parallel > 1:
        from train.parallel.expert_parallel import ExpertParallel

        return ExpertParallel(model, cfg, info)
    return DataParallel(model, cfg, info)


def forward_loss(model, batch, cfg: TrainConfig, device):
    images = batch["images"].to(device, non_blocking=True)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = cfg.autocast_dtype
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return model(images, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                     batch["labels"].to(device))


def forward_backward(par, batch: dict, cfg: TrainConfig, scale: float = 1.0, sync: bool = True,
                     backward: bool = True) -> torch.Tensor:
    """One batch forward (and backward, gradients scaled by `scale`; `sync` on the optimiser step's
    last one): its (loss, main, mtp, aux) on this rank, zeros where a rank holds no loss."""
    if par.pipelined:
        return par.run(batch, scale, backward)
    with par.sync(sync):
        out = forward_loss(par.model, batch, cfg, par.info.device)
        if backward:
            (out.loss * scale).backward()
    return torch.stack([out.loss, out.main, out.mtp, out.aux]).detach()


def train_step(par, opt, sched, stream, cfg: TrainConfig) -> dict:
    """One optimiser step over grad_accum batches; a non-finite loss on any rank skips the step."""
    opt.zero_grad(set_to_none=True)
    n = cfg.optim.grad_accum
    sums = torch.zeros(4, dtype=torch.float64, device=par.info.device)
    tokens = images = 0
    for i in range(n):
        batch = stream.next()
        sums += forward_backward(par, batch, cfg, scale=1.0 / n, sync=i == n - 1).double() / n
        tokens += int(batch["attention_mask"].sum())
        images += batch["images"].shape[0]
    # Ranks without losses (a pipeline's earlier stages) add zeros: over the replicas this is the
    # mean loss, and every rank sees the same finiteness, so all skip a bad step together.
    sums = D.sum_over_ranks(sums, par.info) / par.dp_size
    stats = {f"loss_{k}": float(v) for k, v in zip(("main", "mtp", "aux"), sums[1:])}
    stats |= {"tokens": tokens, "images": images}
    if not bool(torch.isfinite(sums).all()):
        opt.zero_grad(set_to_none=True)
        sched.step()
        return stats | {"skipped": True}
    stats["grad_norm"] = par.clip_grads(cfg.optim.grad_clip)
    opt.step()
    sched.step()
    stats["load"], stats["load_max_over_mean"] = par.balance_routers()
    return stats | {"skipped": False}


@torch.no_grad()
def validation_loss(par, cfg: TrainConfig, open_stream) -> float:
    """Mean validation loss (main LM loss) over eval_batches batches and every replica."""
    if not cfg.data.val:
        return float("nan")
    par.train(False)
    stream = open_stream(cfg.data.val, resampled=False, num_workers=0)
    total = torch.zeros(2, dtype=torch.float64, device=par.info.device)
    with plain_precision(par.parts, cfg):
        for _ in range(cfg.eval_batches):
            batch = stream.next(stop_at_epoch_end=True)
            if par.stop_together(batch is None):
                break
            total[0] += forward_backward(par, batch, cfg, backward=False)[1].double()
            total[1] += par.holds_loss
    par.train(True)
    total = D.sum_over_ranks(total, par.info)
    return float(total[0] / total[1].clamp(min=1))


def plain_precision(model, cfg: TrainConfig):
    """Evaluation runs the FP8-converted layers in plain precision."""
    if cfg.precision != "fp8":
        return contextlib.nullcontext()
    from train import fp8

    return fp8.fp8_disabled(model)


def train(cfg: TrainConfig, resume: str | None = None, model: CaptionModel | None = None,
          tokenizer: Tokenizer | None = None, export: str | None = None,
          save_adapters: str | None = None) -> Path:
    """Run (or continue) a training run; returns the final checkpoint directory. `export` writes a
    bf16 Captioner (adapters merged), `save_adapters` the LoRA adapters alone."""
    check_runnable(cfg)
    cfg = cfg.replace(model=cfg.model.with_tasks(cfg.add_tasks))  # the prompts of new tasks
    if cfg.pipeline.stages > 1:
        from train.parallel.pipeline import check_supported

        check_supported(cfg)
    info = D.setup()
    if cfg.expert_parallel > 1:
        from train.parallel.expert_parallel import check_world

        check_world(cfg, info)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    say = (lambda m: tqdm.write(m)) if info.is_main else (lambda m: None)
    tokenizer = tokenizer or build_tokenizer(cfg, info, Path(cfg.out_dir), say)
    model = model or build_model(cfg, tokenizer)
    candidates = resume_point(model, cfg, info, resume, say)
    par = parallelize(prepare(model, cfg, info, log=say), cfg, info)
    open_stream = stream_opener(cfg, tokenizer, model, par.data_info)
    say(describe(model))
    say(par.describe())
    del model  # a pipeline rank keeps only its stages' modules alive
    opt, sched = build_optimizer(par.parts, cfg)
    state = RunState()
    if candidates:
        ckpt, state = resume_from(candidates, lambda p: load_train_state(p, par, opt, sched), say)
        say(f"resumed from {ckpt} at step {state.step}")
    last = run_steps(par, opt, sched, state, cfg, tokenizer, open_stream, say)
    if export and info.is_main:
        say(f"exported {export_model(par.full_model(last), tokenizer, export, cfg, state)}")
    if save_adapters and info.is_main:
        from train.lora_files import save_adapters as write_adapters

        say(f"adapters saved in {write_adapters(par.full_model(last), save_adapters, cfg.lora)}")
    D.barrier(info)
    return last


def run_steps(par, opt, sched, state: RunState, cfg: TrainConfig, tokenizer, open_stream, say) -> Path:
    """The loop: step, count, log (with the validation loss), save; returns the last checkpoint."""
    stream = open_stream(cfg.data.train, position=state.data, augment=True)
    runlog = RunLog(Path(cfg.out_dir), par.info.is_main, cfg.tensorboard)
    runlog.start_at(state.step)
    par.train(True)
    bar = tqdm(total=cfg.optim.max_steps, initial=state.step, disable=not par.info.is_main,
               dynamic_ncols=True, desc="train")
    t0, last = time.perf_counter(), None
    while state.step < cfg.optim.max_steps:
        stats = train_step(par, opt, sched, stream, cfg)
        state.count(stats, stream.position())
        if state.bad_steps >= cfg.max_bad_steps:
            last = checkpoint(par, tokenizer, opt, sched, state, cfg, runlog)
            raise TrainingStopped(
                f"{state.bad_steps} consecutive steps had a non-finite loss (step {state.step}); "
                f"the last good weights are saved in {last}. Lower optim.lr or check the data."
            )
        bar.update(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.optim.max_steps:
            record = log_record(state, time.perf_counter() - t0, sched.get_last_lr()[-1], stream.data_errors(),
                                par.data_info.world_size)
            if cfg.eval_every and state.step % cfg.eval_every == 0:
                record["val_loss"] = validation_loss(par, cfg, open_stream)
            runlog.write(record)
            bar.set_postfix(loss=f"{record['loss_main']:.3f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}", img_s=f"{record['images_per_s']:.1f}")
            state.log_window, t0 = [], time.perf_counter()
        if state.step % cfg.save_every == 0 or state.step == cfg.optim.max_steps:
            last = checkpoint(par, tokenizer, opt, sched, state, cfg, runlog)
    bar.close()
    say(stream.data_errors().summary())
    return last or latest_checkpoint(cfg.out_dir)


def checkpoint(par, tokenizer, opt, sched, state: RunState, cfg: TrainConfig, runlog: RunLog) -> Path:
    path = save(par, tokenizer, opt, sched, state, cfg)
    runlog.plot(Path(cfg.out_dir) / "loss.png")  # rank 0's log only: a no-op elsewhere
    return path
