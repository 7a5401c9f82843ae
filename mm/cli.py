"""The `mm` command: one console script, one sub-command per job.

    mm caption IMAGES|DIR|GLOB|SHARDS... [--checkpoint DIR] [--task T] [--out file.jsonl]
    mm caption SHARDS --output-dir DIR [--format jsonl|parquet|wds] [--workers N] [--ray [ADDRESS]]
    mm batch IN.jsonl OUT.jsonl      OpenAI Batch API request lines -> output lines
    mm shards synth|convert ...      write webdataset shards
    mm train CONFIG [--key.path=value ...]
    mm finetune --from CHECKPOINT_OR_HF_LM ...
    mm eval --checkpoint DIR --data SHARDS
    mm serve                         the Gradio app

Each sub-command lives in its own module (`add_arguments(parser)` + `run(args) -> int`)
and is imported only when used, so `mm caption` never loads the training stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "caption": ("mm.caption_cli", "caption images, folders, globs or webdataset shards"),
    "batch": ("mm.batch_cli", "answer OpenAI Batch API request lines (JSONL) with OpenAI Batch output lines"),
    "shards": ("train.data.shards", "write webdataset shards (synthetic scenes, or convert a folder)"),
    "train": ("train.cli", "train a captioner from a JSON config"),
    "finetune": ("train.finetune", "fine-tune a checkpoint, or a timm encoder + DeepSeek-format LM"),
    "eval": ("train.eval.scorer", "score a checkpoint on shards (BLEU-4, ROUGE-L, CIDEr, exact match)"),
    "calibrate": ("train.eval.calibrate", "fit a checkpoint's image-familiarity statistics and confidence threshold"),
    "serve": ("app", "serve the Gradio app"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mm", description="DeepSeek-style image captioner")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[name][0])
    cmd = argparse.ArgumentParser(prog=f"mm {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd)
    args, extra = cmd.parse_known_args(argv[1:])
    if extra and not getattr(module, "ACCEPTS_OVERRIDES", False):
        cmd.error(f"unrecognised arguments: {' '.join(extra)}")
    args.overrides = extra
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
