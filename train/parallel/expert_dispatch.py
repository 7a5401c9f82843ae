"""Expert parallelism's token dispatch: the routed experts of every MoE layer split over N ranks,
tokens sent to the ranks that hold their experts by all-to-all and brought back for the combine.

Layout (torchtitan's and DeepSpeed's): EP groups are N consecutive ranks (one node's GPUs when
N <= GPUs per node, so the all-to-all stays on NVLink); EP rank r holds experts
[r E/N, (r+1) E/N) of every MoE layer. The ranks that hold the same experts (rank % N equal)
form the expert's replica group, world / N of them, over which its gradients are averaged.
Under a pipeline the same grid is carved out of each stage's data-parallel ranks (world =
stages x dp, rank = pp_rank * dp + dp_rank, train/parallel/pipeline.py): the ranks of an EP group
run the same stages under the same schedule, so they issue the same all-to-alls in the same order.

One dispatch (`Dispatch.__call__`), after the unchanged router:
1. each token is sent *once* to every rank that holds at least one of its top-k experts, with
   its combine weights for that rank's experts and which of its local experts they are. So with
   group-limited routing and `n_group` a multiple of N (DeepSeek-V3's node-limited routing, M =
   `topk_group`) a token travels to at most M ranks, whatever k is;
2. the counts are exchanged first (all_to_all_single), then the rows go by torch's functional,
   autograd-aware all_to_all_single, asynchronously: the shared experts run while they travel
   (the simplest form of DeepSeek-V3's computation-communication overlap);
3. the receiver runs its local experts through the experts module's own `grouped_linear`
   (lm.moe.combine_experts), so FP8 and LoRA's expert path apply unchanged, weights each output
   and sums a token's outputs per row; the sums go back by a second all-to-all and are added up.

No capacity factor, no dropped tokens; a rank whose experts get no tokens still takes part
in every collective (with empty buffers), so the backward's all-to-alls always match up.
Summation order: a token's outputs are added in ascending expert order, as in the one-process
dispatch, so the forward equals it to the last bit when the expert GEMMs do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from lm.moe import MoE, combine_experts, moe_layers
from train.parallel.dist import DistInfo


@dataclass
class ExpertGroups:
    """This rank's place in its stage's (replica, ep) grid: dp_rank = replica * ep_size + ep_rank."""

    ep_size: int
    ep_rank: int
    replicas: int  # dp / ep_size ranks of the stage hold each expert
    ep_group: dist.ProcessGroup | None
    replica_group: dist.ProcessGroup | None
    replica: int = 0  # which of them this rank is

    @property
    def dp_size(self) -> int:
        return self.replicas * self.ep_size

    def owned(self, n_experts: int) -> slice:
        per = n_experts // self.ep_size
        return slice(self.ep_rank * per, (self.ep_rank + 1) * per)


def expert_group_ranks(world: int, ep_size: int, stages: int = 1) -> tuple[list[list[int]], list[list[int]]]:
    """Global ranks of every EP group and every replica group, stage by stage: world = stages x dp,
    rank = pp_rank * dp + dp_rank (pipeline.make_grid's layout; stages = 1 without a pipeline)."""
    dp = world // stages
    ep_groups, replica_groups = [], []
    for base in range(0, world, dp):
        ep_groups += [[base + r * ep_size + e for e in range(ep_size)] for r in range(dp // ep_size)]
        replica_groups += [[base + r * ep_size + e for r in range(dp // ep_size)] for e in range(ep_size)]
    return ep_groups, replica_groups


def make_expert_groups(info: DistInfo, ep_size: int, stages: int = 1) -> ExpertGroups:
    """Process groups of EP degree `ep_size` within each stage's data-parallel ranks (every rank must
    call it: new_group is collective, so every rank creates every group, in the same order)."""
    ep_ranks, replica_ranks = expert_group_ranks(info.world_size, ep_size, stages)
    # Plain new_group rather than a DeviceMesh, as train/parallel/pipeline.py explains.
    ep_group = replica_group = None
    for ranks in ep_ranks:
        group = dist.new_group(ranks)
        if info.rank in ranks:
            ep_group = group
    for ranks in replica_ranks:
        group = dist.new_group(ranks)
        if info.rank in ranks:
            replica_group = group
    dp = info.world_size // stages
    replica, ep_rank = divmod(info.rank % dp, ep_size)
    return ExpertGroups(ep_size, ep_rank, dp // ep_size, ep_group, replica_group, replica)


def send_plan(idx: torch.Tensor, per_rank: int, ranks: int):
    """Where the tokens of one dispatch go, each token once per rank holding any of its experts.

    idx [N, K] global expert ids -> (token [S]: source token of each sent row, ordered by
    destination rank then token; here [S, K]: which of the token's choices that rank holds;
    slots [S, K]: their local expert ids, -1 for the others; rows per destination [ranks]).
    """
    dest_k = idx // per_rank  # [N, K]
    to = torch.zeros(idx.shape[0], ranks, dtype=torch.bool, device=idx.device).scatter_(1, dest_k, True)
    dest, token = to.T.nonzero(as_tuple=True)
    here = dest_k[token] == dest[:, None]
    slots = torch.where(here, idx[token] - dest[:, None] * per_rank, -1)
    return token, here, slots, to.sum(0)


class Dispatch:
    """Stands in for an MoE layer's `routed_and_shared` (lm/moe.py): the routed experts of this rank
    run the tokens the EP group sends them; the shared experts run while the tokens travel.

    `overlap=False` computes the shared experts only after the tokens arrived (the benchmark's
    baseline); `waits`, when a list, receives the seconds each dispatch spent waiting for its
    tokens after the overlapped work: the communication left exposed.
    """

    def __init__(self, moe: MoE, groups: ExpertGroups, overlap: bool = True):
        self.moe, self.groups, self.overlap = moe, groups, overlap
        self.per_rank = moe.n_experts // groups.ep_size
        self.waits: list[float] | None = None

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor):
        group, d = self.groups.ep_group, x.shape[1]
        token, here, slots, sends = send_plan(idx, self.per_rank, self.groups.ep_size)
        recv_splits, send_splits = exchange_counts(sends, group), sends.tolist()
        # The combine weights travel with the rows (in the rows' dtype, as the one-process combine
        # casts them to the experts' output dtype) so a token comes back once per rank, not once per expert.
        w = torch.where(here, weights[token], 0.0).to(x.dtype)
        packed = torch.cat([x.index_select(0, token), w], 1)  # [S, D + K]
        recv = funcol.all_to_all_single(packed, recv_splits, send_splits, group)  # in flight
        recv_slots = slots.new_empty(sum(recv_splits), slots.shape[1])
        work = dist.all_to_all_single(recv_slots, slots, recv_splits, send_splits, group=group, async_op=True)
        shared = self.shared(x) if self.overlap else None
        start = time.perf_counter()
        work.wait()
        recv = funcol.wait_tensor(recv)
        if self.waits is not None:
            self.waits.append(time.perf_counter() - start)
        if not self.overlap:
            shared = self.shared(x)
        rows, j = (recv_slots >= 0).nonzero(as_tuple=True)
        out, _ = combine_experts(self.moe.experts, recv[:, :d], rows, recv_slots[rows, j], recv[:, d:][rows, j],
                                 self.per_rank, recv.shape[0])
        back = funcol.all_to_all_single(out, send_splits, recv_splits, group)
        return x.new_zeros(x.shape).index_add(0, token, funcol.wait_tensor(back)), shared

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.moe.shared_experts(x) if self.moe.shared_experts is not None else None


def exchange_counts(sends: torch.Tensor, group) -> list[int]:
    """Rows each rank of the group sends this one, from what this one sends each of them."""
    recv = torch.empty_like(sends)
    dist.all_to_all_single(recv, sends, group=group)
    return recv.tolist()


def expert_tensors(model: nn.Module) -> dict[str, int]:
    """Name -> global expert count of every tensor that holds one slice per routed expert along
    dim 0: the stacked expert weights and their per-expert LoRA adapters."""
    names = {}
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            for p_name, p in m.experts.named_parameters():
                if p.dim() >= 1 and p.shape[0] == m.n_experts:
                    names[f"{name}.experts.{p_name}" if name else f"experts.{p_name}"] = m.n_experts
    return names


def shard_experts(model: nn.Module, groups: ExpertGroups) -> dict[str, int]:
    """The conversion pass: every MoE layer keeps only its local experts' slices (new Parameters,
    before any optimiser exists) and dispatches through `Dispatch`. Returns `expert_tensors`."""
    names = expert_tensors(model)
    modules = dict(model.named_modules())
    for name in names:
        owner, attr = name.rsplit(".", 1)
        module = modules[owner]
        p = getattr(module, attr)
        local = nn.Parameter(p.detach()[groups.owned(p.shape[0])].clone(), requires_grad=p.requires_grad)
        setattr(module, attr, local)
    for m in moe_layers(model):
        m.routed_and_shared = Dispatch(m, groups)
    return names
