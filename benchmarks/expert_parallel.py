"""Expert parallelism at EP = 1, 2, 4 over the same world (gloo on CPU, NCCL on GPUs): per rank,
the experts' bytes (weights + AdamW state), peak RSS, step time, all-to-all bytes per token with and
without node-limited routing, and the dispatch's exposed communication with and without the overlap.

The model is a stack of the project's own MoE layers (lm.MoE: router, routed experts through
grouped_linear, shared experts) with pre-RMSNorm residuals and a squared-error loss on fixed random
data, trained with AdamW exactly as train/ does it: EP=1 is plain DDP; EP=N shards the experts with
train/parallel/expert_dispatch.py and reduces their gradients with ExpertParallel.clip_grads. Each EP
degree runs in fresh processes, so each peak RSS is its own.

- expert bytes: this rank's expert parameters + AdamW's two moments after a step;
- a2a bytes/token: rows a rank sends to *other* ranks x (hidden + top-k weights) x element size, per
  routed token; `per_pair` is what a dispatch sending one row per (token, expert) pair would send;
  `limited` routes with n_group = 4 groups, topk_group = 2 (DeepSeek-V3's node-limited routing with
  M = 2 when a group is a rank's experts);
- exposed comm: time spent waiting for the dispatched tokens after the work overlapped with the
  all-to-all (the shared experts), summed over layers, median over steps; without the overlap the
  shared experts run after the wait.
- losses: each step's loss (mean over ranks) must equal the EP=1 (DDP) run's; dropped tokens are
  the routed (token, expert) pairs minus those the experts computed, summed over ranks.

    python benchmarks/expert_parallel.py [--ranks 4] [--eps 1 2 4] [--experts 16] [--dim 256] [--tokens 512]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lm.config import LMConfig
from lm.moe import MoE
from lm.norm import RMSNorm
from train.config import LoRAConfig
from train.parallel import expert_dispatch as X
from train.parallel.data_parallel import DataParallel
from train.parallel.dist import DistInfo
from train.parallel.expert_parallel import ExpertParallel


class Stack(nn.Module):
    def __init__(self, cfg: LMConfig, layers: int):
        super().__init__()
        self.norms = nn.ModuleList(RMSNorm(cfg.hidden_size) for _ in range(layers))
        self.moes = nn.ModuleList(MoE(cfg) for _ in range(layers))

    def forward(self, x):
        for norm, moe in zip(self.norms, self.moes):
            x = x + moe(norm(x))[0]
        return x


def lm_config(args, limited: bool) -> LMConfig:
    return LMConfig(vocab_size=16, hidden_size=args.dim, num_hidden_layers=args.layers, num_attention_heads=1,
                    n_routed_experts=args.experts, num_experts_per_tok=args.topk, n_shared_experts=args.shared,
                    moe_intermediate_size=args.inter, n_group=4 if limited else 1, topk_group=2 if limited else 1,
                    first_k_dense_replace=0)


def build(args, ep: int, info: DistInfo, limited: bool = False):
    torch.manual_seed(0)
    model = Stack(lm_config(args, limited), args.layers)
    for name, p in model.named_parameters():
        if "norm" not in name:
            nn.init.normal_(p, std=0.05)
    cfg = SimpleNamespace(expert_parallel=ep, parallel="ddp", lora=LoRAConfig())  # what the parallelism reads
    par = ExpertParallel(model, cfg, info) if ep > 1 else DataParallel(model, cfg, info)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, par, opt


def data(args, rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return (torch.randn(1, args.tokens, args.dim, generator=g), torch.randn(1, args.tokens, args.dim, generator=g))


class Counter:
    """Wraps expert_dispatch's send_plan and combine_experts to count what a rank sends and computes."""

    def __init__(self, ep_rank: int):
        self.ep_rank, self.remote_rows, self.remote_pairs, self.tokens, self.routed, self.computed = ep_rank, 0, 0, 0, 0, 0
        self.row_bytes = 0  # what one sent row carries: hidden + the k weights, and k int64 expert slots
        real_plan, real_combine = X.send_plan, X.combine_experts

        def send_plan(idx, per_rank, ranks):
            out = real_plan(idx, per_rank, ranks)
            sends = out[3]
            self.remote_rows += int(sends.sum() - sends[self.ep_rank])
            self.remote_pairs += int((idx // per_rank != self.ep_rank).sum())
            self.tokens += idx.shape[0]
            self.k = idx.shape[1]
            self.routed += idx.numel()
            return out

        def combine_experts(experts, x, token, expert, *rest):
            self.computed += expert.numel()
            self.row_bytes = (x.shape[1] + self.k) * x.element_size() + 8 * self.k
            return real_combine(experts, x, token, expert, *rest)

        X.send_plan, X.combine_experts = send_plan, combine_experts

    def per_token(self) -> dict:
        t = max(self.tokens, 1)
        return {"rows": self.remote_rows / t, "bytes": self.remote_rows * self.row_bytes / t,
                "per_pair_bytes": self.remote_pairs * self.row_bytes / t}


def train_steps(args, model, par, opt, rank: int, steps: int, overlap: bool = True):
    dispatchers = [m.routed_and_shared for m in model.moes if isinstance(m.routed_and_shared, X.Dispatch)]
    times, exposed, losses = [], [], []
    for step in range(steps):
        for d in dispatchers:
            d.overlap, d.waits = overlap, []
        x, y = data(args, rank, step)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = (par.model(x) - y).square().mean()
        loss.backward()
        par.clip_grads(1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        exposed.append(sum(sum(d.waits) for d in dispatchers))
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / dist.get_world_size())
    return times, exposed, losses


def expert_bytes(model, opt) -> int:
    total = 0
    for moe in model.moes:
        for p in moe.experts.parameters():
            total += p.numel() * p.element_size()
            total += sum(v.numel() * v.element_size() for v in opt.state[p].values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total


def worker(rank: int, args, ep: int, port: int, out: dict):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks)
    info = DistInfo(rank=rank, world_size=args.ranks)
    counter = Counter(rank % ep)
    model, par, opt = build(args, ep, info)
    times, hidden, losses = train_steps(args, model, par, opt, rank, args.warmup + args.steps)
    _, bare, _ = train_steps(args, model, par, opt, rank, args.warmup + args.steps, overlap=False)
    unlimited = counter.per_token()
    mine = {"expert_bytes": expert_bytes(model, opt), "routed": counter.routed, "computed": counter.computed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    limited_counter = Counter(rank % ep)
    lmodel, lpar, lopt = build(args, ep, info, limited=True)
    train_steps(args, lmodel, lpar, lopt, rank, 2)
    w = args.warmup
    mine |= {"step_s": statistics.median(times[w:]), "exposed_overlap_s": statistics.median(hidden[w:]),
             "exposed_plain_s": statistics.median(bare[w:]), "a2a": unlimited, "a2a_limited": limited_counter.per_token(),
             "losses": losses}
    everyone = [None] * args.ranks
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        out[ep] = everyone
    dist.destroy_process_group()


def summarise(ranks: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in ranks)  # noqa: E731
    return {"expert_bytes": max(r["expert_bytes"] for r in ranks), "peak_rss_mb": round(med("peak_rss_mb"), 1),
            "step_ms": round(1e3 * med("step_s"), 1),
            "exposed_comm_ms": {"overlap": round(1e3 * med("exposed_overlap_s"), 2),
                                "no_overlap": round(1e3 * med("exposed_plain_s"), 2)},
            "a2a_bytes_per_token": {"unlimited": round(statistics.mean(r["a2a"]["bytes"] for r in ranks), 1),
                                    "node_limited": round(statistics.mean(r["a2a_limited"]["bytes"] for r in ranks), 1),
                                    "per_pair_unlimited": round(statistics.mean(r["a2a"]["per_pair_bytes"]
                                                                                for r in ranks), 1)},
            "dropped_pairs": sum(r["routed"] for r in ranks) - sum(r["computed"] for r in ranks),
            "losses": ranks[0]["losses"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--eps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--shared", type=int, default=2, help="shared experts (the work the dispatch hides behind)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--inter", type=int, default=128, help="moe_intermediate_size")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank per step")
    p.add_argument("--steps", type=int, default=5, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = {}
    with mp.Manager() as manager:
        out = manager.dict()
        for ep in args.eps:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(worker, args=(args, ep, port, out), nprocs=args.ranks, join=True)
            result[ep] = summarise(out[ep])
    base = result[args.eps[0]]
    print(f"{args.layers} MoE layers, {args.experts} experts top-{args.topk} + {args.shared} shared, d={args.dim}, "
          f"{args.tokens} tokens per rank, {args.ranks} ranks (gloo)")
    print(f"{'EP':>3}{'expert MB':>11}{'x EP=1':>8}{'RSS MB':>9}{'step ms':>9}{'a2a B/tok':>11}{'limited':>9}"
          f"{'exposed ms':>12}{'no overlap':>12}{'hidden':>8}{'loss diff':>11}")
    for ep, r in result.items():
        hidden = 1 - r["exposed_comm_ms"]["overlap"] / max(r["exposed_comm_ms"]["no_overlap"], 1e-9)
        r["expert_bytes_ratio"] = round(r["expert_bytes"] / base["expert_bytes"], 4)
        r["overlap_hidden_fraction"] = round(hidden, 3) if ep > 1 else None
        r["max_loss_diff_vs_ddp"] = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        print(f"{ep:>3}{r['expert_bytes'] / 2**20:>11.2f}{r['expert_bytes_ratio']:>8.3f}{r['peak_rss_mb']:>9.0f}"
              f"{r['step_ms']:>9.1f}{r['a2a_bytes_per_token']['unlimited']:>11.0f}"
              f"{r['a2a_bytes_per_token']['node_limited']:>9.0f}{r['exposed_comm_ms']['overlap']:>12.2f}"
              f"{r['exposed_comm_ms']['no_overlap']:>12.2f}{f'{hidden:.0%}' if ep > 1 else '-':>8}"
              f"{r['max_loss_diff_vs_ddp']:>11.1e}")
    for r in result.values():
        r.pop("losses")
    print(json.dumps({"bench": "expert_parallel", "device": "cpu", "backend": "gloo", "ranks": args.ranks,
                      "experts": args.experts, "topk": args.topk, "shared": args.shared, "dim": args.dim,
                      "tokens_per_rank": args.tokens, "layers": args.layers, "steps": args.steps,
                      "ep": {str(k): v for k, v in result.items()}}))


if __name__ == "__main__":
    main()
