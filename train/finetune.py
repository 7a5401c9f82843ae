"""`mm finetune`: continue from a Captioner checkpoint, or assemble a new captioner from a
timm encoder and a DeepSeek-format language model, and train it in LLaVA-style stages.

    --stage projector   only the projector trains (encoder and LM frozen): the alignment stage
    --stage full        everything trains, except what --freeze / --unfreeze-last hold back
    --stage mtp         only the MTP modules train; the rest stays bit-identical, so greedy
                        captions do not change. With --mtp-depths N > 1 the MTP module learns
                        to draft N tokens ahead by chaining, and speculative decoding then
                        drafts N tokens per verification by default.
    --stage lora        only low-rank adapters train (train/lora.py; the config's `lora` section:
                        rank, alpha, dropout, target patterns, experts, vision, and whether the
                        projector or MTP train fully beside them). --export merges them into a
                        plain Captioner; --save-adapters writes them alone; --adapters DIR
                        continues from saved ones (and implies --stage lora).

A config's `add_tasks` ({"count": "Count:"}) gives the model new task prompts to learn.
The trainable parameter count of each part is printed before training starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--from", dest="source", required=True,
                   help="a Captioner checkpoint directory, or a Hugging Face DeepSeek-V2/V3 LM directory")
    p.add_argument("--data", required=True, help="training shard URLs")
    p.add_argument("--val", default="", help="validation shard URLs")
    p.add_argument("--config", default=None, help="a training config (JSON) for optimiser, precision, ...")
    p.add_argument("--stage", choices=["projector", "full", "mtp", "lora"], default=None,
                   help="what trains (default: full, or lora with --adapters)")
    p.add_argument("--adapters", default=None, metavar="DIR", help="continue from LoRA adapters saved here")
    p.add_argument("--save-adapters", default=None, metavar="DIR",
                   help="after a LoRA run, write the adapters (safetensors + config JSON) here")
    p.add_argument("--mtp-depths", type=int, default=0,
                   help="MTP depths in the loss (the model's mtp_depths); 0 keeps the source's")
    p.add_argument("--freeze", action="append", default=[], choices=["vision", "lm"],
                   help="keep a part frozen in the full stage (repeatable)")
    p.add_argument("--unfreeze-last", type=int, default=0,
                   help="with --freeze vision: still train the encoder's last N blocks")
    p.add_argument("--vision", default="resnet18", help="timm model name (with an HF LM source)")
    p.add_argument("--vision-file", default="", help="local weights for the timm encoder")
    p.add_argument("--image-size", type=int, default=0, help="encoder input size (default: the model's)")
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="after training, write a bf16 Captioner directory here")
    p.add_argument("--resume", default=None, metavar="auto|DIR")
    p.epilog = "Any training config key can be overridden: --optim.lr=1e-4 --optim.max_steps=2000"


def resize_vocab(transformer: nn.Module, n: int):
    """Grow the embedding and output head to n rows; new rows start at the mean row."""
    old = transformer.embed.weight.shape[0]
    if n <= old:
        return
    with torch.no_grad():
        for name in ("embed", "head"):
            mod = getattr(transformer, name)
            w = mod.weight
            new = torch.cat([w, w.mean(0, keepdim=True).expand(n - old, -1)], 0)
            mod.weight = nn.Parameter(new.clone())
            if isinstance(mod, nn.Embedding):
                mod.num_embeddings = n
            else:
                mod.out_features = n
    transformer.cfg = transformer.cfg.replace(vocab_size=n)


def from_source(args):
    """(model, tokenizer) from a Captioner checkpoint or an HF DeepSeek LM + a timm encoder."""
    import lm
    from mm.checkpoint import load_checkpoint
    from mm.config import MMConfig, VisionConfig
    from mm.model import CaptionModel
    from mm.tokenizer import Tokenizer

    src = Path(args.source)
    if (src / "model.safetensors").is_file() and (src / "tokenizer.json").is_file() and _is_captioner(src):
        model, tokenizer = load_checkpoint(src)
        model.calibration = None  # fitted to the encoder before training moves it: `mm calibrate` again
        return model.train(), tokenizer
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is neither a Captioner checkpoint nor an HF model directory (no config.json)")
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src} has no tokenizer.json: the LM's tokenizer is needed")
    transformer = lm.load_hf(src)
    tokenizer = Tokenizer.from_file(src / "tokenizer.json")
    resize_vocab(transformer, tokenizer.vocab_size)
    vision = VisionConfig(model_name=args.vision, pretrained_file=args.vision_file,
                          image_size=args.image_size or 224, pretrained=bool(args.vision_file))
    cfg = MMConfig(vision=vision, lm=transformer.cfg)
    return CaptionModel(cfg, image_token_id=tokenizer.image_id, language_model=transformer), tokenizer


def _is_captioner(path: Path) -> bool:
    import json

    from mm.checkpoint import CheckpointError

    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:  # bad JSON, or bytes that are not UTF-8
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from e
    return isinstance(data, dict) and "vision" in data


def set_mtp_depths(model, depths: int):
    """A new model config with lm.mtp_depths = depths (the model hands it to its LM, the config's owner)."""
    if not model.cfg.lm.num_nextn_predict_layers:
        raise ValueError("--mtp-depths: the model has no MTP module (num_nextn_predict_layers is 0)")
    model.cfg = model.cfg.replace(lm=model.cfg.lm.replace(mtp_depths=depths))  # validates


def set_stage(model, stage: str, freeze: list[str], unfreeze_last: int, lora=None):
    """What trains; in the lora stage the adapters, added later (train.build.prepare), train too."""
    if stage == "mtp" and not (len(model.lm.mtp) and model.cfg.lm.mtp_lambda > 0):
        raise ValueError("--stage mtp: the model has no MTP module to train (num_nextn_predict_layers "
                         f"{model.cfg.lm.num_nextn_predict_layers}, mtp_lambda {model.cfg.lm.mtp_lambda})")
    if stage == "lora":
        model.requires_grad_(False)
        model.vision.freeze(0)
        model.projector.requires_grad_(lora.train_projector)
        model.lm.mtp.requires_grad_(lora.train_mtp)
        return
    if stage in ("projector", "mtp"):
        model.requires_grad_(False)
        (model.projector if stage == "projector" else model.lm.mtp).requires_grad_(True)
        model.vision.freeze(0)  # also holds its normalisation statistics
        return
    model.requires_grad_(True)
    if "vision" in freeze:
        model.vision.freeze(unfreeze_last)
    if "lm" in freeze:
        model.lm.requires_grad_(False)


def run(args) -> int:
    from lm.config import ConfigError
    from train.cli import run_training
    from train.config import load_train_config

    overrides = list(args.overrides) + [f"--data.train={args.data}", f"--out_dir={args.out}"]
    if args.val:
        overrides.append(f"--data.val={args.val}")
    try:
        check_outputs(args)
        stage = args.stage or ("lora" if args.adapters else "full")
        model, tokenizer = from_source(args)
        if args.mtp_depths:
            set_mtp_depths(model, args.mtp_depths)
        cfg = load_train_config(args.config, overrides)
        model.cfg = model.cfg.with_tasks(cfg.add_tasks)
        cfg = lora_options(cfg.replace(model=model.cfg), stage, args)
        if cfg.vision_warmup.steps:  # it is for encoders trained from scratch; it would overwrite these
            print("mm finetune: vision_warmup is skipped when fine-tuning", file=sys.stderr)
            cfg = cfg.replace(vision_warmup=cfg.vision_warmup.replace(steps=0))
        set_stage(model, stage, args.freeze, args.unfreeze_last, cfg.lora)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"mm finetune: {e}", file=sys.stderr)
        return 2
    return run_training("finetune", cfg, resume=args.resume, model=model, tokenizer=tokenizer, export=args.export,
                        save_adapters=args.save_adapters)


def check_outputs(args) -> None:
    """--export and --save-adapters are written after training: refuse a path that cannot take
    them now, not after hours of training."""
    from mm.checkpoint import check_output_dir
    from train.lora_files import ADAPTER_FILE

    for flag, path, marker in (("--export", args.export, "config.json"),
                               ("--save-adapters", args.save_adapters, ADAPTER_FILE)):
        if path:
            check_output_dir(path, flag, marker)


def lora_options(cfg, stage: str, args):
    """The config's lora section switched on by the lora stage (with the structure of --adapters)."""
    from lm.config import ConfigError
    from train.lora_files import with_saved_structure

    if stage != "lora":
        for flag, given in (("--adapters", args.adapters), ("--save-adapters", args.save_adapters),
                            ("lora.enabled", cfg.lora.enabled)):
            if given:
                raise ConfigError(f"{flag} needs --stage lora (the stage is {stage})")
        return cfg
    lora = cfg.lora.replace(enabled=True)
    if args.adapters:
        lora, changed = with_saved_structure(lora, args.adapters)
        for key, (ours, saved) in changed.items():
            print(f"mm finetune: lora.{key} is {saved!r} as in {args.adapters} (the config said {ours!r})",
                  file=sys.stderr)
    return cfg.replace(lora=lora)
