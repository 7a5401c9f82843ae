"""Pipeline schedules on 2 CPU processes (gloo): step time and bubble (idle) fraction.

A stack of residual MLP blocks (pre-LayerNorm, GELU) is cut evenly into stages the way
train/parallel/pipeline.py cuts the captioner (one stage per rank for gpipe and 1f1b, two for
interleaved1f1b, zbv and dualpipev) and trained on fixed random data with each of
PyTorch's schedules. Compute time is measured inside the stages (PipelineStage's
forward, backward and weight-backward of each microbatch); the bubble of a rank is
1 - compute / wall time of the step, which also counts communication and waiting. The
baseline is the whole stack in one process over the same microbatches (gradient
accumulation): an ideal 2-rank pipeline takes half its time.

Every process (the baseline too) runs with torch.set_num_threads(1), so the two ranks
do not compete for the two cores of a small machine.

    python benchmarks/pipeline.py [--layers 8] [--microbatches 8] [--dim 256] [--rows 64] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.pipelining import PipelineStage

from train.parallel.stages import SCHEDULES, rank_stages, split_layers, stages_per_rank

RANKS = 2


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class TimedStage(PipelineStage):
    """A PipelineStage that adds the time of its compute calls (never its waits) to `busy`."""

    busy = 0.0

    def _timed(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TimedStage.busy += time.perf_counter() - t0

    def forward_one_chunk(self, *args, **kwargs):
        return self._timed(super().forward_one_chunk, *args, **kwargs)

    def backward_one_chunk(self, *args, **kwargs):
        return self._timed(super().backward_one_chunk, *args, **kwargs)

    def backward_weight_one_chunk(self, *args, **kwargs):
        return self._timed(super().backward_weight_one_chunk, *args, **kwargs)


def mse(output, target):
    return (output - target).pow(2).mean()


def make_data(args):
    g = torch.Generator().manual_seed(1)
    n = args.microbatches * args.rows
    return torch.randn(n, args.dim, generator=g), torch.randn(n, args.dim, generator=g)


def build_blocks(args) -> list[nn.Module]:
    torch.manual_seed(0)
    return [Block(args.dim) for _ in range(args.layers)]


def baseline(args) -> float:
    """Median step time (s) of the whole stack in one process, microbatch by microbatch."""
    model = nn.Sequential(*build_blocks(args))
    x, y = make_data(args)
    times = []
    for step in range(args.steps + 2):
        t0 = time.perf_counter()
        for xm, ym in zip(x.chunk(args.microbatches), y.chunk(args.microbatches)):
            (mse(model(xm), ym) / args.microbatches).backward()
        model.zero_grad(set_to_none=True)
        if step >= 2:  # the first steps allocate and warm caches
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_schedule(args, name: str, rank: int) -> dict:
    blocks = build_blocks(args)
    ranges = split_layers(args.layers, RANKS, name)
    ids = rank_stages(name, rank, RANKS)
    stages = [TimedStage(nn.Sequential(*(blocks[j] for j in ranges[i])), i, len(ranges), torch.device("cpu"))
              for i in ids]
    schedule = SCHEDULES[name](stages if stages_per_rank(name) > 1 else stages[0],
                               n_microbatches=args.microbatches, loss_fn=mse)
    x, y = make_data(args)
    walls, busy = [], []
    for step in range(args.steps + 2):
        dist.barrier()
        TimedStage.busy = 0.0
        t0 = time.perf_counter()
        schedule.step(*((x,) if 0 in ids else ()), target=y if len(ranges) - 1 in ids else None)
        if step >= 2:  # step 0 infers shapes, step 1 warms up
            walls.append(time.perf_counter() - t0)
            busy.append(TimedStage.busy)
        for s in stages:
            s.submod.zero_grad(set_to_none=True)
    wall = statistics.median(walls)
    return {"step_ms": 1e3 * wall, "compute_ms": 1e3 * statistics.median(busy),
            "bubble": 1 - statistics.median(b / w for b, w in zip(busy, walls))}


def worker(rank: int, args, port: int, base: float, out: dict):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    for name in args.schedules:
        mine = run_schedule(args, name, rank)
        both = [None] * RANKS
        dist.all_gather_object(both, mine)
        if rank == 0:
            out[name] = {"step_ms": max(b["step_ms"] for b in both),
                         "compute_ms": [round(b["compute_ms"], 1) for b in both],
                         "bubble": statistics.mean(b["bubble"] for b in both),
                         "speedup": base / (max(b["step_ms"] for b in both) / 1e3)}
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--rows", type=int, default=64, help="rows (tokens) per microbatch")
    p.add_argument("--steps", type=int, default=3, help="measured steps per schedule (after 2 warm-up steps)")
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    base = baseline(args)  # before the ranks start, so nothing else competes for the cores
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(args, port, base, out), nprocs=RANKS, join=True)
        result = dict(out)
    base *= 1e3
    print(f"{args.layers} blocks (d={args.dim}), {args.microbatches} microbatches x {args.rows} rows, "
          f"{RANKS} ranks; one process: {base:.0f} ms/step (ideal pipeline {base / RANKS:.0f} ms)")
    print(f"{'schedule':<16}{'stages/rank':>12}{'step ms':>10}{'compute ms (r0, r1)':>22}{'bubble':>9}{'speedup':>9}")
    for name in args.schedules:
        r = result[name]
        print(f"{name:<16}{stages_per_rank(name):>12}{r['step_ms']:>10.0f}{str(r['compute_ms']):>22}"
              f"{r['bubble']:>9.1%}{r['speedup']:>9.2f}")
    print(json.dumps({"bench": "pipeline", "device": "cpu", "ranks": RANKS, "layers": args.layers,
                      "microbatches": args.microbatches, "dim": args.dim, "rows": args.rows,
                      "baseline_ms": round(base, 1),
                      "schedules": {k: {"step_ms": round(v["step_ms"], 1), "bubble": round(v["bubble"], 3),
                                        "speedup": round(v["speedup"], 2)} for k, v in result.items()}}))


if __name__ == "__main__":
    main()
