"""Process-group set-up for `torchrun`: gloo on CPU, NCCL on GPU; DDP or FSDP2 wrapping.

Everything here is a no-op in a single process, so the same training script runs
on one CPU and under `torchrun --nproc_per_node=8` unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistInfo:
    """Join the process group that torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_over_ranks(t: torch.Tensor, info: DistInfo, group=None) -> torch.Tensor:
    """`t` summed over the ranks of `group` (default: all), in place; unchanged in a single process."""
    if info.enabled:
        dist.all_reduce(t, group=group)
    return t


def barrier(info: DistInfo):
    if info.enabled:
        dist.barrier()


def wrap(model: torch.nn.Module, info: DistInfo, parallel: str, keep_own: tuple[str, ...] = ()) -> torch.nn.Module:
    """DDP (the default) or FSDP2 `fully_shard` per LM block, vision encoder and root. Both leave the
    parameters named in `keep_own` alone (expert parallelism reduces them over their own group)."""
    if not info.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        own = {p for n, p in model.named_parameters() if n in keep_own} or None
        for block in model.lm.layers:
            fully_shard(block, ignored_params=own)
        fully_shard(model.vision)
        fully_shard(model, ignored_params=own)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lm.moe import MoE

    ids = [info.local_rank] if info.device.type == "cuda" else None
    # Each rank's MoE load counters must stay its own (train/parallel/router.py sums them),
    # so DDP must not overwrite them with rank 0's at every forward as it does other buffers
    # (BatchNorm statistics, which should stay in step across ranks).
    counters = [f"{name}.{buf}" for name, m in model.named_modules() if isinstance(m, MoE)
                for buf in ("load",)]
    DDP._set_params_and_buffers_to_ignore_for_model(model, counters + list(keep_own))
    return DDP(model, device_ids=ids, find_unused_parameters=False)

