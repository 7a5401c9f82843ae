"""The trainer: one loop for a toy run on a CPU and for `torchrun` on many GPUs.

Reading order: `build_tokenizer`, `build_model`, `prepare` (FP8 -> LoRA -> compile -> DDP/FSDP,
torchtitan's order with the adapters added to the converted layers), `build_optimizer`, `train_step`, `evaluate`, `save`, `train`.
After each optimiser step the MoE router biases move toward balanced load
(auxiliary-loss-free balancing), with the load summed over all ranks.
A resumed run continues bit-for-bit: the data position is (epoch, batch in epoch),
each epoch's order a function of (seed, epoch, rank), and optimiser, scheduler and
RNG state travel in `train_state/`.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

import lm
from lm.config import CheckpointError, ConfigError
from mm.model import CaptionModel
from mm.samples import DataErrors, expand_urls
from mm.tokenizer import Tokenizer
from train import dist as D
from train.augment import Augment
from train.checkpoints import (
    latest_checkpoint,
    load_train_state,
    resume_candidates,
    resume_from,
    save_training_checkpoint,
)
from train.config import TrainConfig, with_tasks
from train.data import check_shards
from train.metrics_log import RunLog
from train.stream import DataStream, read_texts, split_urls
from vision.preprocess import build_transform

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite losses: the run stops instead of drifting."""


def check_runnable(cfg: TrainConfig) -> None:
    """What the config alone cannot check, before any work: the shards and the tokenizer file."""
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give the training shards (e.g. 'data/train-{000000..000009}.tar')")
    for name in ("train", "val") if cfg.data.val else ("train",):
        try:
            check_shards(expand_urls(split_urls(getattr(cfg.data, name))))
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data.{name}: {e}") from e
    if cfg.tokenizer and not Path(cfg.tokenizer).exists():
        raise ConfigError(f"tokenizer: {cfg.tokenizer} does not exist")


def build_tokenizer(cfg: TrainConfig, info: D.DistInfo, out_dir: Path, say=print) -> Tokenizer:
    if cfg.tokenizer:
        try:
            return Tokenizer.from_file(cfg.tokenizer)
        except ValueError as e:
            raise ConfigError(f"tokenizer: {e}") from e
    path = out_dir / "tokenizer.json"
    if info.is_main and not path.exists():
        skipped = DataErrors()
        texts = read_texts(cfg.data.train, cfg.data.tasks, cfg.tokenizer_samples, skipped)
        say(f"tokenizer: trained on {len(texts)} texts; {skipped.summary()}")
        if not texts:
            raise ConfigError(f"data.train: no usable texts in {cfg.data.train!r} to train a tokenizer on "
                              f"({skipped.summary()})")
        out_dir.mkdir(parents=True, exist_ok=True)
        Tokenizer.train(texts, vocab_size=cfg.tokenizer_vocab).save(path)
    D.barrier(info)
    try:
        return Tokenizer.from_file(path)
    except ValueError as e:  # the run's own tokenizer, damaged since it was written
        raise CheckpointError(f"{e}; delete it to train a new one (a resumed run needs the original)") from e


def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> CaptionModel:
    model_cfg = cfg.model
    if model_cfg.lm.vocab_size < tokenizer.vocab_size:
        model_cfg = model_cfg.replace(lm=model_cfg.lm.replace(vocab_size=tokenizer.vocab_size))
    return CaptionModel(model_cfg, image_token_id=tokenizer.image_id)


def prepare(model: CaptionModel, cfg: TrainConfig, info: D.DistInfo, log=print) -> nn.Module:
    """Device, memory format, FP8, compile, then data/fully-sharded parallelism."""
    model.to(info.device)
    if cfg.channels_last:
        model.vision.to_channels_last()
    if cfg.precision == "fp8":
        from train import fp8

        report = fp8.convert_to_fp8(model, backend=cfg.fp8_backend,
                                    module_filter=lambda name, _m: not name.startswith("vision."))
        log(f"fp8: {len(report.converted)} layers converted; kept in bf16: "
            + (", ".join(f"{n} ({why})" for n, why in report.skipped) or "none"))
    if cfg.lora.enabled:
        add_adapters(model, cfg, log)
    if cfg.compile:
        model.lm.compile()
    return D.wrap(model, info, cfg.parallel)


def add_adapters(model: CaptionModel, cfg: TrainConfig, log=print) -> None:
    """LoRA adapters on the (converted) layers, from saved ones when lora.adapters names them."""
    from train.lora import apply_lora
    from train.lora_files import load_adapters

    log(apply_lora(model, cfg.lora).summary())
    if cfg.lora.adapters:
        log(f"lora: {load_adapters(model, cfg.lora.adapters)} tensors from {cfg.lora.adapters}")


def image_transform(model: CaptionModel):
    return build_transform(model.vision.data_config)


def param_groups(model: CaptionModel, cfg: TrainConfig) -> list[dict]:
    """Per-part learning rates; no weight decay on norms, biases, embeddings, router biases."""
    o = cfg.optim
    lrs = {"vision": o.lr_vision or o.lr, "projector": o.lr_projector or o.lr, "lm": o.lr}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = name.split(".", 1)[0]
        part = part if part in lrs else "lm"
        no_decay = p.ndim < 2 or "embed" in name or "norm" in name or name.endswith(".bias")
        key = (part, not no_decay)
        groups.setdefault(key, {"params": [], "lr": lrs[part],
                                "weight_decay": o.weight_decay if not no_decay else 0.0})
        groups[key]["params"].append(p)
    return list(groups.values())


def build_optimizer(model: CaptionModel, cfg: TrainConfig):
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, cfg), betas=tuple(o.betas), eps=o.eps)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to min_lr_ratio
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        t = (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def forward_loss(model, batch, cfg: TrainConfig, device):
    images = batch["images"].to(device, non_blocking=True)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = AUTOCAST[cfg.precision]
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return model(images, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                     batch["labels"].to(device))


def train_step(model, opt, sched, stream: DataStream, cfg: TrainConfig, info: D.DistInfo) -> dict:
    """One optimiser step over grad_accum micro-batches; a non-finite loss skips the step."""
    opt.zero_grad(set_to_none=True)
    sums = {"main": 0.0, "mtp": 0.0, "aux": 0.0}
    tokens = images = 0
    finite = True
    for _ in range(cfg.optim.grad_accum):
        batch = stream.next()
        out = forward_loss(model, batch, cfg, info.device)
        finite = finite and bool(torch.isfinite(out.loss))
        (out.loss / cfg.optim.grad_accum).backward()
        for k in sums:
            sums[k] += float(getattr(out, k).detach()) / cfg.optim.grad_accum
        tokens += int(batch["attention_mask"].sum())
        images += batch["images"].shape[0]
    stats = {f"loss_{k}": v for k, v in sums.items()} | {"tokens": tokens, "images": images}
    if not D.all_true(finite, info):
        opt.zero_grad(set_to_none=True)
        sched.step()
        return stats | {"skipped": True}
    params = [p for p in model.parameters() if p.grad is not None]
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip))
    opt.step()
    sched.step()
    layers = lm.moe_layers(D.unwrap(model).lm)
    stats["load"] = torch.stack([m.load.float() for m in layers]) if layers else None  # this rank's
    stats["load_max_over_mean"] = lm.update_router_bias(D.unwrap(model).lm)
    return stats | {"skipped": False}


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, tokenizer, info: D.DistInfo) -> float:
    """Mean validation loss (main LM loss) over eval_batches batches."""
    if not cfg.data.val:
        return float("nan")
    was_training = model.training
    model.eval()
    raw = D.unwrap(model)
    stream = DataStream(cfg, cfg.data.val, tokenizer, raw.num_image_tokens, image_transform(raw), info,
                        resampled=False, num_workers=0)
    losses = []
    with _plain_precision(raw, cfg):
        for _ in range(cfg.eval_batches):
            batch = stream.next(stop_at_epoch_end=True)
            if batch is None:
                break
            losses.append(float(forward_loss(model, batch, cfg, info.device).main))
    model.train(was_training)
    return D.mean_over_ranks(sum(losses) / max(1, len(losses)), info)


def _plain_precision(raw, cfg: TrainConfig):
    """Evaluation runs the FP8-converted layers in plain precision."""
    if cfg.precision != "fp8":
        return contextlib.nullcontext()
    from train import fp8

    return fp8.fp8_disabled(raw)


def train(cfg: TrainConfig, resume: str | None = None, model: CaptionModel | None = None,
          tokenizer: Tokenizer | None = None, export: str | None = None,
          save_adapters: str | None = None) -> Path:
    """Run (or continue) a training run; returns the final checkpoint directory. `export` writes a
    bf16 Captioner (adapters merged), `save_adapters` the LoRA adapters alone."""
    check_runnable(cfg)
    cfg = cfg.replace(model=with_tasks(cfg.model, cfg.add_tasks))  # the prompts of new tasks
    if cfg.pipeline.stages > 1:
        from train import pipeline

        return pipeline.train(cfg, resume=resume, export=export, model=model, tokenizer=tokenizer)
    info = D.setup()
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    say = (lambda m: tqdm.write(m)) if info.is_main else (lambda m: None)
    tokenizer = tokenizer or build_tokenizer(cfg, info, out_dir, say)
    model = model or build_model(cfg, tokenizer)
    raw = model
    candidates = resume_point(raw, cfg, info, resume, say)
    model = prepare(model, cfg, info, log=say)
    opt, sched = build_optimizer(raw, cfg)
    state = fresh_state()
    if candidates:
        ckpt, state = resume_from(candidates, lambda p: load_train_state(p, raw, opt, sched, info), say)
        say(f"resumed from {ckpt} at step {state['step']}")
    stream = DataStream(cfg, cfg.data.train, tokenizer, raw.num_image_tokens, image_transform(raw), info,
                        position=state["data"], augment=True)
    runlog = RunLog(out_dir, info.is_main, cfg.tensorboard)
    runlog.start_at(state["step"])
    _describe(raw, say)
    model.train()
    bar = tqdm(total=cfg.optim.max_steps, initial=state["step"], disable=not info.is_main,
               dynamic_ncols=True, desc="train")
    t0, last = time.perf_counter(), None
    while state["step"] < cfg.optim.max_steps:
        stats = train_step(model, opt, sched, stream, cfg, info)
        count_step(state, stats, stream)
        if state["bad_steps"] >= cfg.max_bad_steps:
            last = save(raw, tokenizer, opt, sched, state, cfg, info, runlog)
            raise TrainingStopped(
                f"{state['bad_steps']} consecutive steps had a non-finite loss (step {state['step']}); "
                f"the last good weights are saved in {last}. Lower optim.lr or check the data."
            )
        bar.update(1)
        if state["step"] % cfg.log_every == 0 or state["step"] == cfg.optim.max_steps:
            record = _log_record(state["log_window"], time.perf_counter() - t0, state, sched, stream, info)
            if cfg.eval_every and state["step"] % cfg.eval_every == 0:
                record["val_loss"] = evaluate(model, cfg, tokenizer, info)
            runlog.write(record)
            bar.set_postfix(loss=f"{record['loss_main']:.3f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}", img_s=f"{record['images_per_s']:.1f}")
            state["log_window"], t0 = [], time.perf_counter()
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.optim.max_steps:
            last = save(raw, tokenizer, opt, sched, state, cfg, info, runlog)
    bar.close()
    say(stream.data_errors().summary())
    if last is None:
        last = latest_checkpoint(out_dir)
    if export and info.is_main:
        from train.checkpoints import export_model

        say(f"exported {export_model(raw, tokenizer, export, cfg, state)}")
    if save_adapters and info.is_main:
        from train.lora_files import save_adapters as write_adapters

        say(f"adapters saved in {write_adapters(raw, save_adapters, cfg.lora)}")
    D.barrier(info)
    return last


def fresh_state() -> dict:
    """The run state a checkpoint saves; `log_window` holds the steps since the last log record, so
    a resumed run's first record averages the same steps as an uninterrupted run's."""
    return {"step": 0, "data": {"epoch": 0, "batch": 0}, "bad_steps": 0, "skipped": 0, "log_window": []}


def count_step(state: dict, stats: dict, stream: DataStream) -> None:
    state["step"] += 1
    state["data"] = stream.position()
    state["skipped"] += stats["skipped"]
    state["bad_steps"] = state["bad_steps"] + 1 if stats["skipped"] else 0
    state["log_window"].append(stats)


def resume_point(raw: CaptionModel, cfg: TrainConfig, info: D.DistInfo, resume: str | None, say) -> list[Path]:
    """The checkpoints to try resuming from, in order (see resume_from); none starts a fresh run,
    whose encoder gets the warm-up first."""
    candidates = resume_candidates(cfg.out_dir, resume)
    if not candidates and cfg.vision_warmup.steps > 0:
        warm_up(raw, cfg, info, say)
    return candidates


def warm_up(raw: CaptionModel, cfg: TrainConfig, info: D.DistInfo, say) -> dict[str, float]:
    """The encoder's supervised warm-up, before any wrapping; every rank runs it with the same seed
    (and DDP broadcasts rank 0's weights when it wraps the model)."""
    from train.vision_warmup import warm_up_vision

    w = cfg.vision_warmup
    raw.to(info.device)
    return warm_up_vision(raw.vision, image_transform(raw), steps=w.steps, lr=w.lr, batch_size=w.batch_size,
                          weight_decay=w.weight_decay, seed=cfg.seed, autocast_dtype=AUTOCAST[cfg.precision],
                          augment=Augment(cfg.augment, geometric=False) if cfg.augment.enabled else None,
                          channels_last=cfg.channels_last, device=info.device, show_progress=info.is_main,
                          say=say)


def save(raw, tokenizer, opt, sched, state, cfg, info, runlog) -> Path:
    path = save_training_checkpoint(raw, tokenizer, opt, sched, state, cfg, info)
    if info.is_main:
        runlog.plot(Path(cfg.out_dir) / "loss.png")
    return path


def _log_record(window, seconds, state, sched, stream, info) -> dict:
    done = [w for w in window if not w["skipped"]] or window
    n = len(done)
    rec = {"step": state["step"], "lr": sched.get_last_lr()[-1]}
    for k in ("loss_main", "loss_mtp", "loss_aux"):
        rec[k] = sum(w[k] for w in done) / n
    rec["grad_norm"] = sum(w.get("grad_norm", 0.0) for w in done) / n
    rec["tokens_per_s"] = sum(w["tokens"] for w in window) * info.world_size / max(seconds, 1e-9)
    rec["images_per_s"] = sum(w["images"] for w in window) * info.world_size / max(seconds, 1e-9)
    loads = [w["load"] for w in done if w.get("load") is not None]
    if loads:  # balance over the whole interval (several batches and tasks), per MoE layer
        rec["expert_load_max_over_mean"] = lm.max_over_mean(torch.stack([x.cpu() for x in loads]).sum(0))
        rec["expert_load_last_step"] = done[-1]["load_max_over_mean"]
    rec["skipped_steps"] = state["skipped"]
    skipped = stream.data_errors()
    rec["data_errors"] = skipped.total
    rec["data_errors_by_reason"] = dict(skipped.counts)
    return rec


def _describe(model: CaptionModel, say):
    parts = {"vision": model.vision, "projector": model.projector, "lm": model.lm}
    counts = ", ".join(
        f"{k} {sum(p.numel() for p in m.parameters() if p.requires_grad) / 1e6:.2f}M trainable"
        f" / {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"
        for k, m in parts.items()
    )
    trainable, total = trainable_parameters(model)
    say(f"model: {counts}; {model.num_image_tokens} image tokens; trainable {trainable / 1e6:.3f}M of "
        f"{total / 1e6:.2f}M parameters ({100 * trainable / max(total, 1):.2f}%)")


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, adapters included in both."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
