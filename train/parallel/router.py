"""Auxiliary-loss-free balancing across ranks: the step hook that moves the MoE router biases.

DeepSeek-V3 moves each bias by the load of the whole global batch. Every rank counts its own
tokens (lm/moe.py keeps the counters; train/parallel/dist.py tells DDP not to overwrite
them); after the optimiser step this hook sums the counters over the data-parallel ranks,
one all-reduce for all layers, and hands the sum to `lm.update_router_bias`, which does the
bias math. So the model code never talks to other processes.
"""

from __future__ import annotations

import torch
from torch import nn

import lm
from train.parallel.dist import DistInfo, sum_over_ranks


def balance_routers(model: nn.Module, info: DistInfo, group=None) -> tuple[torch.Tensor | None, list[float]]:
    """The bias step of `model`'s MoE layers with their loads summed over `group` (default: every
    rank). Returns this rank's loads [L, E], for the log, and each layer's max/mean global load."""
    local = lm.router_loads(model)
    if local is None:
        return None, []
    return local, lm.update_router_bias(model, sum_over_ranks(local.clone(), info, group))
