"""`mm caption ... --ray [ADDRESS]`: the same per-shard job on Ray Data, across devices and machines.

The units still to do (mm/bulk_caption.py `plan`, run on the driver, so resume and
`--num-shards` mean the same here) become a dataset of one row, and one block, each;
`map_batches` with a class gives a stateful actor pool (`--actors`, `--gpus-per-actor`):
each actor loads the Captioner once and captions whole units with `caption_units`, writing
the same outputs the one-process path writes, into `--output-dir`, which must therefore be
a directory every node sees. Ray Data restarts an actor that dies and retries its unit
(its default `max_restarts=-1`, `max_task_retries=-1`); a unit's output is renamed into
place only when complete, so a retried unit is still written exactly once. A unit that
raises fails alone: the actor returns its summary with the error, and the job goes on.
Ray's own writers (`write_webdataset`, `write_parquet`) name files per block, not per
input shard, hence the job's own writer.
"""

from __future__ import annotations

import json
import sys

import numpy as np

INSTALL = "pip install 'mm-captioner[ray]' (or: pip install 'ray[data]')"


def check_ray(args) -> None:
    """Ray importable and the task known, before anything starts; ValueError otherwise."""
    import importlib.util

    from mm.captioner import DEFAULT_MODEL_DIR
    from mm.checkpoint import load_config

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
        raise ValueError(f"--ray needs Ray Data, which is not installed: {INSTALL}")
    if args.output_dir is None:
        raise ValueError("--ray needs --output-dir: each actor writes its shards' outputs there")
    load_config(args.checkpoint or DEFAULT_MODEL_DIR).prompt(args.task)  # an unknown task names the known ones


class CaptionActor:
    """One Captioner per actor; each call captions the units named in the batch."""

    def __init__(self, checkpoint, device, dtype, job, units):
        from mm.captioner import Captioner

        self.cap = Captioner.from_pretrained(checkpoint, device=device, dtype=dtype, batch_size=job.batch_size)
        self.job, self.units = job, units

    def __call__(self, batch: dict) -> dict:
        from mm.bulk_caption import caption_units

        out = []
        for i in batch["unit"]:
            unit = self.units[int(i)]
            try:
                (summary,) = caption_units(self.cap, [unit], self.job, report=lambda s: None)
            except Exception as e:  # this unit fails, reported; the job and this actor go on
                summary = {"name": unit.name, "source": unit.source, "status": "failed", "captioned": 0,
                           "skipped": {}, "examples": [], "error": f"{type(e).__name__}: {e}"}
            out.append(json.dumps(summary))
        return {"summary": np.array(out, dtype=object)}


def caption_on_ray(args, job, units) -> list[dict]:
    """Run the units on Ray Data; -> their summaries (each also reported on stderr)."""
    import ray

    from mm.bulk_caption import unit_line

    if not units:
        return []
    started = not ray.is_initialized()
    if started:
        ray.init(address=args.ray or None, log_to_driver=False)
    try:
        ds = ray.data.from_items([{"unit": i} for i in range(len(units))], override_num_blocks=len(units))
        ds = ds.map_batches(CaptionActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=args.actors),
                            num_gpus=args.gpus_per_actor,
                            fn_constructor_kwargs=dict(checkpoint=args.checkpoint, device=args.device,
                                                       dtype=args.dtype, job=job, units=units))
        summaries = []
        for row in ds.iter_rows():
            summaries.append(json.loads(row["summary"]))
            print(unit_line(summaries[-1]), file=sys.stderr)
        return summaries
    finally:
        if started:
            ray.shutdown()
