"""What a training run is made of, before its first step: the checked config, the tokenizer,
the model, the encoder warm-up, and the model prepared for its parallelism.

`prepare` applies, in torchtitan's order, device and memory format -> FP8 -> LoRA (adapters
on the converted layers) -> compile; the parallelism (train/parallel/) wraps or cuts what it
returns. A fresh run's encoder gets its warm-up before any of that (`resume_point`).
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from lm.config import CheckpointError, ConfigError
from mm.model import CaptionModel
from mm.samples import DataErrors, expand_urls
from mm.tokenizer import Tokenizer
from train.checkpoints import resume_candidates
from train.config import TrainConfig
from train.data.augment import Augment
from train.data.reader import check_shards
from train.data.stream import DataStream, read_texts
from train.parallel import dist as D
from vision.preprocess import build_transform


def check_runnable(cfg: TrainConfig) -> None:
    """What the config alone cannot check, before any work: the shards and the tokenizer file."""
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give the training shards (e.g. 'data/train-{000000..000009}.tar')")
    for name in ("train", "val") if cfg.data.val else ("train",):
        try:
            check_shards(expand_urls(getattr(cfg.data, name)))
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
        texts = read_texts(cfg.data.train, cfg.data.tasks, cfg.tokenizer_samples, skipped, cfg.data.allow_pipe)
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


def stream_opener(cfg: TrainConfig, tokenizer: Tokenizer, model: CaptionModel, info: D.DistInfo):
    """`open(urls, **options)` -> a DataStream of batches for this model, read by the ranks of `info`."""
    n_image, transform = model.num_image_tokens, build_transform(model.vision.data_config)

    def open_stream(urls: str, **options) -> DataStream:
        return DataStream(cfg, urls, tokenizer, n_image, transform, info, **options)

    return open_stream


def prepare(model: CaptionModel, cfg: TrainConfig, info: D.DistInfo, log=print) -> nn.Module:
    """Device, memory format, FP8, LoRA, compile; the parallelism wraps the result."""
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
    return model


def add_adapters(model: CaptionModel, cfg: TrainConfig, log=print) -> None:
    """LoRA adapters on the (converted) layers, from saved ones when lora.adapters names them."""
    from train.lora import apply_lora
    from train.lora_files import load_adapters

    log(apply_lora(model, cfg.lora).summary())
    if cfg.lora.adapters:
        log(f"lora: {load_adapters(model, cfg.lora.adapters)} tensors from {cfg.lora.adapters}")


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
    return warm_up_vision(raw.vision, build_transform(raw.vision.data_config), steps=w.steps, lr=w.lr,
                          batch_size=w.batch_size, weight_decay=w.weight_decay, seed=cfg.seed,
                          autocast_dtype=cfg.autocast_dtype,
                          augment=Augment(cfg.augment, geometric=False) if cfg.augment.enabled else None,
                          channels_last=cfg.channels_last, device=info.device, show_progress=info.is_main,
                          say=say)


def describe(model: CaptionModel) -> str:
    parts = {"vision": model.vision, "projector": model.projector, "lm": model.lm}
    counts = ", ".join(
        f"{k} {sum(p.numel() for p in m.parameters() if p.requires_grad) / 1e6:.2f}M trainable"
        f" / {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"
        for k, m in parts.items()
    )
    params = list(model.parameters())  # adapters included
    trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    return (f"model: {counts}; {model.num_image_tokens} image tokens; trainable {trainable / 1e6:.3f}M of "
            f"{total / 1e6:.2f}M parameters ({100 * trainable / max(total, 1):.2f}%)")
