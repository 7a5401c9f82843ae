"""Parallelism from outside the model: DDP gradient accumulation all-reduces on the last
micro-step only and takes the same steps as syncing every micro-step, and the router-bias
step sums the routers' loads over ranks before lm.update_router_bias moves the biases."""

import multiprocessing
import sys
from pathlib import Path

import torch
from torch import nn

import lm
from train.parallel.dist import DistInfo
from train.parallel.router import balance_routers

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for conftest helpers
from conftest import micro_config, run_two_ranks  # noqa: E402

COUNT_ALLREDUCES = """
cfg = cfg.replace(optim=cfg.optim.replace(max_steps=1, grad_accum=2), log_every=1)
import contextlib
import torch.distributed as dist
from train.parallel import data_parallel as DP
real_init = DP.DataParallel.__init__
def counting_init(self, model, cfg, info):
    real_init(self, model, cfg, info)
    def hook(state, bucket):  # DDP's own averaging all-reduce; each backward that syncs is counted once
        if bucket.is_last():
            with open({out!r} + f"/allreduce{{dist.get_rank()}}", "a") as f:
                f.write("x")
        fut = dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    self.model.register_comm_hook(None, hook)
DP.DataParallel.__init__ = counting_init
if {every_micro_step!r}:  # the old way: DDP syncs every micro-step
    DP.DataParallel.sync = lambda self, sync: contextlib.nullcontext()
"""


def test_ddp_accumulation_syncs_on_the_last_micro_step_only(synth_shards, tmp_path):
    runs = {}
    for every in (False, True):
        out = tmp_path / str(every)
        out.mkdir()
        runs[every] = run_two_ranks(synth_shards["train"], out, COUNT_ALLREDUCES.format(out=str(out), every_micro_step=every))
        runs[every] += (len((out / "allreduce0").read_text()),)
    (a0, a1, last_only), (b0, _, every_step) = runs[False], runs[True]
    assert (last_only, every_step) == (1, 2)  # grad_accum 2: one synced backward per step, not two
    params = [k for k in a0 if "running_" not in k and "num_batches_tracked" not in k]
    assert [k for k in params if not torch.equal(a0[k], a1[k])] == []  # the ranks agree
    worst = max(float((a0[k].float() - b0[k].float()).abs().max()) for k in params)
    # The same weights as syncing every micro-step, up to summation order. One step only: later AdamW
    # steps amplify rounding in near-zero gradients (the update's slope is lr / eps) past any tolerance.
    assert worst < 1e-5, worst
    biases = [k for k in a0 if k.endswith("gate.bias")]
    assert biases and all(torch.equal(a0[k], b0[k]) for k in biases)


def _balance(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    cfg = micro_config().lm
    model = nn.ModuleList([lm.MoE(cfg), lm.MoE(cfg)])
    model[0].load.copy_(torch.tensor([4.0, 0, 0, 0]) if rank == 0 else torch.tensor([0, 0, 0, 4.0]))
    model[1].load.copy_(torch.tensor([1.0, 1, 1, 1]))
    loads, ratios = balance_routers(model, DistInfo(rank=rank, world_size=2))
    torch.save({"loads": loads, "ratios": ratios, "bias": [m.gate.bias.clone() for m in model],
                "counters": [m.load.clone() for m in model]}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_router_loads_are_summed_over_ranks_before_the_bias_step(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_balance, args=(r, str(tmp_path / "store"), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    step = micro_config().lm.bias_update_speed
    # the global load of layer 0 is [4, 0, 0, 4] (mean 2) on both ranks; layer 1 is balanced
    want = torch.tensor([-step, step, step, -step])
    for r, g in enumerate(got):
        assert torch.allclose(g["bias"][0], want) and torch.equal(g["bias"][1], torch.zeros(4)), r
        assert g["ratios"] == [2.0, 1.0]
        assert g["loads"][0].tolist() == ([4.0, 0, 0, 0] if r == 0 else [0, 0, 0, 4.0])  # each rank logs its own
        assert all(c.sum() == 0 for c in g["counters"])  # reset for the next step
