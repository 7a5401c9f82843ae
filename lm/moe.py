"""DeepSeekMoE: router, grouped routed experts, shared experts, and load balancing.

Routing (DeepSeek-V3 section 2.1.2, eq. 12-16): scores s = sigmoid (V3) or softmax
(V2) of x W^T in fp32. Experts are *selected* on s + b, where the bias b exists only
for `noaux_tc` and is moved by auxiliary-loss-free balancing; the combine weights
are the *unbiased* s of the chosen experts, normalised (norm_topk_prob) and scaled
by routed_scaling_factor, so the bias can never change what an expert contributes.

Dispatch never loops over tokens: the (token, expert) pairs are sorted by expert,
each expert runs once on its contiguous slice through `grouped_linear` (one
`grouped_mm` call when the kernel supports the dtype/device/shape), and the weighted
outputs are scatter-added back. The gain over the common loop over experts that
indexes a stacked weight W[e] is mostly in backward, where each W[e] costs a
full-size zero gradient (benchmarks/moe.py measures it).

Balancing: `update_router_bias` applies b += gamma * sign(mean_load - load) once
per optimiser step from the load counted since the last update, and an optional
sequence-wise balance loss (eq. 17-20) is returned by the layer when aux_loss_alpha > 0.
Padding tokens are routed and computed (cheaper than compacting) but not counted as load.
The load must be the whole global batch's: the caller sums `router_loads` over ranks
(train/parallel/router.py) and passes the sum in; nothing here talks to other processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm.config import LMConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers, the shared experts, and the reference expert."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def route(logits: torch.Tensor, bias: torch.Tensor | None, cfg: LMConfig):
    """logits [N, E] -> (weights [N, K] fp32, expert ids [N, K], scores [N, E] fp32)."""
    n, e = logits.shape
    scores = logits.float().sigmoid() if cfg.scoring_func == "sigmoid" else logits.float().softmax(-1)
    choice = scores + bias.float() if (bias is not None and cfg.topk_method == "noaux_tc") else scores
    if cfg.n_group > 1 and cfg.topk_method != "greedy":
        grouped = choice.view(n, cfg.n_group, e // cfg.n_group)
        if cfg.topk_method == "noaux_tc":  # V3: a group is as good as its two best (biased) experts
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(-1)
        else:  # V2 group_limited_greedy: its single best expert
            group_scores = grouped.amax(-1)
        keep = group_scores.topk(cfg.topk_group, dim=-1)[1]
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        # -inf as in DeepSeek's reference: biased scores can be negative, so filling
        # with 0.0 (transformers' V2) could pick an expert of a dropped group over a
        # kept one. For softmax scores (> 0, no bias) the two choices agree.
        choice = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
    idx = choice.topk(cfg.num_experts_per_tok, dim=-1)[1]
    weights = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx, scores


class Gate(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # e_score_correction_bias: moved by update_router_bias, never by gradients
        bias = torch.zeros(cfg.n_routed_experts) if cfg.topk_method == "noaux_tc" else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor):
        return route(F.linear(x.float(), self.weight.float()), self.bias, self.cfg)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: grouped_mm's backward
    rejects the stride-0 gradients that e.g. `out.sum().backward()` produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped_mm kernel takes x [M, K] @ w[g]^T (w [G, N, K]) here."""
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype:
        return False
    align = 16 // x.element_size()  # the kernel needs 16-byte aligned row strides
    if x.shape[-1] % align or w.shape[1] % align:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


class RoutedExperts(nn.Module):
    """E SwiGLU experts as stacked weights w1/w3 [E, inter, D] and w2 [E, D, inter]."""

    use_grouped_mm = True  # False forces the per-expert fallback (tests compare both)

    def __init__(self, n_experts: int, dim: int, inter: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter, dim))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, D]: rows grouped by expert in expert order; counts [E]: rows per expert."""
        offsets = counts.cumsum(0).to(torch.int32)  # end row of each expert's slice
        h = F.silu(self.grouped_linear(x_sorted, self.w1, offsets))
        h = h * self.grouped_linear(x_sorted, self.w3, offsets)
        return self.grouped_linear(h, self.w2, offsets)

    def grouped_linear(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows offsets[g-1]:offsets[g] of x [M, K] times w[g]^T (w [G, N, K]) -> [M, N].

        The one place the expert GEMMs happen, so a quantised variant overrides only this.
        """
        w = w.to(x.dtype)
        if self.use_grouped_mm and grouped_mm_supported(x, w):
            return _ContiguousGrad.apply(F.grouped_mm(x, w.transpose(-2, -1), offs=offsets))
        # One matmul per expert on contiguous slices; unbind gives views, so backward
        # assembles the weight gradient once instead of one scatter per expert.
        sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
        parts = [xe @ we.T for xe, we in zip(x.split(sizes), w.unbind(0))]
        return torch.cat(parts) if parts else x.new_zeros(0, w.shape[1])


def combine_experts(experts: RoutedExperts, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                    weight: torch.Tensor, n_experts: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouped dispatch of (token, expert, weight) pairs: rows of x [M, D] sorted by expert, each
    expert run once on its slice, weighted, and summed into out [n_out, D] (each row in ascending
    expert order). Returns (out, pairs per expert [n_experts])."""
    order = expert.argsort(stable=True)
    counts = expert.bincount(minlength=n_experts)
    token = token[order]
    y = experts(x.index_select(0, token), counts)  # backward: one index_add
    y = y * weight[order, None].to(y.dtype)
    return x.new_zeros(n_out, x.shape[1]).index_add(0, token, y), counts


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor, batch: int,
                          valid: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3 eq. 17-20 without alpha: sum_i f_i P_i per sequence, mean over sequences.

    scores [B*T, E] (unbiased), idx [B*T, K]; valid [B, T] bool masks out padding.
    """
    e, k = scores.shape[-1], idx.shape[-1]
    s = scores.view(batch, -1, e)
    s = s / s.sum(-1, keepdim=True)  # s' of eq. 19 (a no-op for softmax scores)
    chosen = torch.zeros_like(s).scatter_(2, idx.view(batch, -1, k), 1.0)
    m = torch.ones_like(s[..., :1]) if valid is None else valid.view(batch, -1, 1).to(s.dtype)
    n_tok = m.sum(1).clamp(min=1)  # [B, 1]
    f = (chosen * m).sum(1) * e / (k * n_tok)  # [B, E], no gradient: an indicator
    p = (s * m).sum(1) / n_tok
    return (f * p).sum(-1).mean()


class MoE(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.bias_update_speed = cfg.bias_update_speed
        self.count_load = False  # count load in eval mode too (training always counts)
        self.gate = Gate(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
                               if cfg.n_shared_experts > 0 else None)
        # the balancing accumulator: summed over training forwards, read and reset by update_router_bias
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None):
        """x [B, T, D]; valid [B, T] bool or None. Returns (y [B, T, D], aux loss scalar, counts [B, E]):
        counts are this forward's real tokens per row and expert, so concurrent callers never mix figures."""
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        weights, idx, scores = self.gate(flat)
        y, shared = self.routed_and_shared(flat, weights, idx)
        counts = self._count(idx, b, valid)
        if shared is not None:
            y = y + shared
        aux = x.new_zeros((), dtype=torch.float32)
        if self.aux_loss_alpha > 0:
            aux = self.aux_loss_alpha * sequence_balance_loss(scores, idx, b, valid)
        return y.view(b, t, d), aux, counts

    def routed_and_shared(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor):
        """x [N, D] -> (routed experts' combined output [N, D], shared experts' output or None).

        The seam of expert parallelism: train/parallel/expert_parallel.py replaces this on an
        instance with a dispatch to other ranks that computes the shared experts while tokens travel.
        """
        y, _ = self.dispatch(x, weights, idx)
        return y, self.shared_experts(x) if self.shared_experts is not None else None

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor):
        """x [N, D] -> (sum_k weights[:, k] * expert_{idx[:, k]}(x) [N, D], tokens per expert [E])."""
        k = idx.shape[1]
        token = torch.arange(idx.numel(), device=idx.device) // k  # source token of each (token, expert) pair
        return combine_experts(self.experts, x, token, idx.flatten(), weights.flatten(), self.n_experts, x.shape[0])

    @torch.no_grad()
    def _count(self, idx: torch.Tensor, batch: int, valid: torch.Tensor | None) -> torch.Tensor:
        """Real tokens of each row per expert [B, E] (fp32); their sum over rows is added to the
        balancing accumulator when training."""
        rows = idx.reshape(batch, -1)  # [B, T*K]
        w = (torch.ones_like(rows, dtype=torch.float32) if valid is None
             else valid.reshape(batch, -1, 1).expand(-1, -1, idx.shape[1]).reshape(batch, -1).float())
        counts = w.new_zeros(batch, self.n_experts).scatter_add_(1, rows, w)
        if self.training or self.count_load:
            if self.load.dtype != torch.float32:  # a model cast to bf16: bf16 cannot count past 256
                self.load = self.load.float()
            self.load.add_(counts.sum(0))
        return counts


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def max_over_mean(loads: torch.Tensor) -> list[float]:
    """Per row of loads [L, E]: max / mean (0 for a row with no load), the balance figure."""
    mean = loads.mean(-1)
    return torch.where(mean > 0, loads.amax(-1) / mean.clamp(min=1e-12), 0.0).tolist()


def load_stats(model: nn.Module) -> list[dict]:
    """Per MoE layer: max/mean of the load counted since the last bias update, and the load."""
    return [{"max_over_mean": max_over_mean(m.load.float()[None])[0], "load": m.load.float().tolist()}
            for m in moe_layers(model)]


def router_loads(model: nn.Module) -> torch.Tensor | None:
    """The load each MoE layer counted since the last bias update, [L, E] fp32 (None without MoE)."""
    layers = moe_layers(model)
    return torch.stack([m.load.float() for m in layers]) if layers else None


@torch.no_grad()
def update_router_bias(model: nn.Module, loads: torch.Tensor | None = None, gamma: float | None = None) -> list[float]:
    """Auxiliary-loss-free balancing step (DeepSeek-V3 section 2.1.2); call once per optimiser step.

    `loads` [L, E] is the load of the whole global batch per MoE layer (`router_loads` summed over
    data-parallel ranks); by default this process's own. Moves each noaux_tc layer's bias by
    gamma * sign(mean - load) (gamma defaults to the config's bias_update_speed), resets the
    counters, and returns each layer's max/mean load before the update. A layer whose router
    weight is frozen (requires_grad False) keeps its bias too.
    """
    layers = moe_layers(model)
    if not layers:
        return []
    loads = router_loads(model) if loads is None else loads
    if loads.shape[0] != len(layers):
        raise ValueError(f"update_router_bias: loads for {loads.shape[0]} MoE layers, the model has {len(layers)}")
    for m, load in zip(layers, loads):
        step = m.bias_update_speed if gamma is None else gamma
        if m.gate.bias is not None and step > 0 and m.gate.weight.requires_grad:
            m.gate.bias += (step * torch.sign(load.mean() - load)).to(m.gate.bias.dtype)
        m.load.zero_()
    return max_over_mean(loads)
