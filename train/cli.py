"""`mm train CONFIG.json [--key.path=value ...]` (also `python -m train`)."""

from __future__ import annotations

import argparse
import sys

from lm.config import CheckpointError, ConfigError

ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("config", nargs="?", help="a training config (JSON); omitted = the defaults")
    p.add_argument("--resume", default=None, metavar="auto|DIR",
                   help="continue a run: 'auto' = the newest checkpoint in out_dir, or a checkpoint directory")
    p.add_argument("--out", default=None, help="the run directory (overrides out_dir)")
    p.add_argument("--preset", default=None, help="model preset (tiny, small) instead of the config's model")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="after training, write a bf16 Captioner directory here")
    p.epilog = "Any config key can be overridden: --optim.lr=3e-4 --model.lm.num_hidden_layers=2"


def run(args) -> int:
    from mm.checkpoint import check_output_dir
    from mm.config import preset
    from train.config import load_train_config

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"--out_dir={args.out}")
    try:
        if args.export:  # written after training: refuse a path that cannot take it now, not hours later
            check_output_dir(args.export, "--export", "config.json")
        cfg = load_train_config(args.config, overrides)
        if args.preset:
            cfg = cfg.replace(model=preset(args.preset))
    except (ConfigError, CheckpointError) as e:
        print(f"mm train: {e}", file=sys.stderr)
        return 2
    return run_training("train", cfg, resume=args.resume, export=args.export)


def run_training(command: str, cfg, **options) -> int:
    """`train(cfg, **options)` with the exit status of `mm train` and `mm finetune`: 2 for what is found
    before the first step (shards, the resume checkpoint), 1 for a run stopped by bad steps."""
    from train.trainer import TrainingStopped, train

    try:
        path = train(cfg, **options)
    except (ConfigError, CheckpointError) as e:
        print(f"mm {command}: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"mm {command}: {e}", file=sys.stderr)
        return 1
    print(f"final checkpoint: {path}", file=sys.stderr)
    return 0
