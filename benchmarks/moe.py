"""MoE layer speed: sorted grouped dispatch (lm.MoE) vs the common loop over experts.

The baseline is the form most MoE code starts from: for each expert e, find its
tokens with `torch.where` and run them through `W1[e]`, `W3[e]`, `W2[e]` indexed out
of the stacked weights. Indexing a stacked parameter inside the loop makes autograd
build (and later sum) a full-size zero gradient per expert, which is what makes the
backward slow. Both variants share the router, the shared expert and the weights,
so the difference is the routed dispatch alone. Times are medians over --runs after
--warmup runs (the first calls pay for kernel set-up): wall clock, and process CPU
time, which is steadier on a busy shared machine. The last line is JSON.

    python benchmarks/moe.py [--tokens 4096] [--runs 7] [--dtype bf16] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import lm


def naive_moe(moe: lm.MoE, x: torch.Tensor) -> torch.Tensor:
    """x [N, D]: the per-expert loop indexing W[e] of the stacked weights."""
    weights, idx, _ = moe.gate(x)
    ex = moe.experts
    y = torch.zeros_like(x)
    for e in range(ex.w1.shape[0]):
        token, slot = torch.where(idx == e)
        if token.numel() == 0:
            continue
        xe = x[token]
        h = F.silu(xe @ ex.w1[e].T) * (xe @ ex.w3[e].T)
        y.index_add_(0, token, (h @ ex.w2[e].T) * weights[token, slot, None].to(x.dtype))
    return y + moe.shared_experts(x)


def ours(moe: lm.MoE, x: torch.Tensor) -> torch.Tensor:
    return moe(x[None])[0][0]


def time_once(fn, moe, x, grad, device: str) -> tuple[float, float, float]:
    """Forward ms, forward+backward ms (wall clock), and forward+backward process CPU ms."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    moe.zero_grad(set_to_none=True)
    x.grad = None
    sync()
    c0, t0 = time.process_time(), time.perf_counter()
    y = fn(moe, x)
    sync()
    t1 = time.perf_counter()
    y.backward(grad)
    sync()
    t2, c2 = time.perf_counter(), time.process_time()
    return (t1 - t0) * 1e3, (t2 - t0) * 1e3, (c2 - c0) * 1e3


def compare(variants: dict, moe, x, grad, runs: int, warmup: int, device: str) -> dict:
    """Per variant, the median of each time_once figure. Runs alternate between the
    variants so that load from other processes on a shared machine hits both alike."""
    times = {name: [] for name in variants}
    for i in range(warmup + runs):
        for name, fn in variants.items():
            t = time_once(fn, moe, x, grad, device)
            if i >= warmup:
                times[name].append(t)
    return {name: tuple(statistics.median(col) for col in zip(*ts)) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = lm.LMConfig(hidden_size=args.hidden, n_routed_experts=args.experts, num_experts_per_tok=args.topk,
                      moe_intermediate_size=args.width, n_shared_experts=1, n_group=1, topk_group=1,
                      num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    moe = lm.Transformer(cfg).layers[1].ffn.to(device=args.device, dtype=dtype).train()
    x = torch.randn(args.tokens, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    with torch.no_grad():
        err = (ours(moe, x).float() - naive_moe(moe, x).float()).abs().max().item()
    rows = compare({"loop over W[e]": naive_moe, "sort + grouped": ours}, moe, x, grad,
                   args.runs, args.warmup, args.device)
    print(f"MoE layer, {args.dtype}, {args.tokens} tokens, hidden {args.hidden}, {args.experts} experts "
          f"top-{args.topk}, width {args.width}, device {args.device}, threads {torch.get_num_threads()}")
    print(f"{'variant':<18}{'fwd ms':>10}{'fwd+bwd ms':>14}{'fwd+bwd CPU ms':>18}")
    for name, (f, t, c) in rows.items():
        print(f"{name:<18}{f:>10.1f}{t:>14.1f}{c:>18.1f}")
    (nf, nt, nc), (of, ot, oc) = rows["loop over W[e]"], rows["sort + grouped"]
    print(f"max |ours - loop| = {err:.3g}")
    print(json.dumps({"bench": "moe", "dtype": args.dtype, "device": args.device, "tokens": args.tokens,
                      "naive_fwd_ms": round(nf, 1), "naive_fwd_bwd_ms": round(nt, 1),
                      "ours_fwd_ms": round(of, 1), "ours_fwd_bwd_ms": round(ot, 1),
                      "naive_cpu_ms": round(nc, 1), "ours_cpu_ms": round(oc, 1), "max_abs_diff": err,
                      "speedup_cpu": round(nc / oc, 2), "speedup": round(nt / ot, 2)}))


if __name__ == "__main__":
    main()
