"""FP8 mixed-precision training with DeepSeek-V3's fine-grained recipe (report section 3.3).

All three GEMMs of a linear layer run on E4M3 operands with FP32 accumulation:
    forward        y  = x W^T    reduce over in  : x in 1x128 tiles (per token), W in 128x128 blocks
    input grad     dx = dy W     reduce over out : dy in 1x128 tiles (per token), W^T in 128x128 blocks
    weight grad    dW = dy^T x   reduce over tokens: dy^T and x^T in 1x128 tiles along the token dim
A tile always runs along the GEMM's reduction dimension, so the per-tile scales factor
out of each partial sum. That is why the weight gradient re-quantises dy and x along
tokens (the report's 1x128 -> 128x1 tile change) instead of reusing the forward
tiles, and why W^T reuses W's blocks (a 128x128 block is its own transpose's block,
so quantising W^T gives exactly the transposed codes and scales). Scales come from
the online absmax at every call; the master weights stay FP32 and untouched, so the
optimiser and the state dict never see FP8. The layer saves x and W for backward as
nn.Linear does (not FP8 copies): simpler, and exact for the re-tiled weight gradient.

`convert_to_fp8` swaps nn.Linear modules for Fp8Linear in place, sharing the same
Parameter objects, and points routed-expert modules (anything with `grouped_linear`
and stacked w1/w2/w3, such as lm.moe.RoutedExperts) at an FP8 grouped GEMM. The
embedding, the output head and the router stay in BF16/FP32 by name ("embed", "head",
"gate"), as do layers whose dimensions are not multiples of 128. `fp8_disabled`
switches the converted modules back to plain precision, e.g. for evaluation. Other passes
(LoRA, train/lora.py) come after this one: they may wrap an FP8 `grouped_linear`, keeping it
as `.original`, which is followed here; a layer already carrying forward hooks is not swapped,
since the new module would not have them.
Quantisation and the two backends (emulate on CPU, scaled_mm on FP8 GPUs) live in
train/fp8/quant.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from train.fp8.quant import BACKENDS, TILE, fp8_matmul_nt

SKIP_SUFFIXES = ("embed", "head", "gate")  # embedding, output head, MoE router


@dataclass(frozen=True)
class _Recipe:
    backend: str
    emulate_dtype: torch.dtype


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """What nn.Linear would return: the autocast dtype when autocast is on, else x's dtype."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _mm(a, b, b_block, recipe: _Recipe):
    return fp8_matmul_nt(a, b, b_block, recipe.backend, torch.float32, recipe.emulate_dtype)


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, recipe, out_dtype):  # x [T, in], weight [out, in]
        ctx.save_for_backward(x, weight, bias)
        ctx.recipe = recipe
        y = _mm(x, weight, TILE, recipe)
        if bias is not None:
            y = y + bias.float()
        return y.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # dy [T, out]
        x, weight, bias = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _mm(dy, weight.t(), TILE, ctx.recipe).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = _mm(dy.t(), x.t(), 1, ctx.recipe).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            db = dy.float().sum(0).to(bias.dtype)
        return dx, dw, db, None, None


class Fp8Linear(nn.Linear):
    """nn.Linear whose forward, input-gradient and weight-gradient GEMMs run in FP8."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, backend: str = "emulate",
                 emulate_dtype: torch.dtype = torch.bfloat16, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        if in_features % TILE or out_features % TILE:
            raise ValueError(f"Fp8Linear needs in/out features that are multiples of {TILE}, "
                             f"found {in_features} -> {out_features}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown FP8 backend {backend!r}; choose one of {BACKENDS}")
        self.recipe = _Recipe(backend, emulate_dtype)
        self.fp8_enabled = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "emulate",
                    emulate_dtype: torch.dtype = torch.bfloat16) -> Fp8Linear:
        """An Fp8Linear holding `linear`'s own Parameter objects (no copy)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, backend,
                  emulate_dtype, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8_enabled:
            return F.linear(x, self.weight, self.bias)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Fp8Linear expects input [..., {self.in_features}], found {tuple(x.shape)}")
        out_dtype = _out_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            y = _Fp8LinearFn.apply(x.reshape(-1, self.in_features), self.weight, self.bias,
                                   self.recipe, out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.recipe.backend}"


def _spans(ends: tuple[int, ...]) -> Iterator[tuple[int, int, int]]:
    start = 0
    for e, end in enumerate(ends):
        yield e, start, end
        start = end


class _Fp8GroupedFn(torch.autograd.Function):
    """Per-expert FP8 GEMMs on the contiguous row slices of x: rows ends[e-1]:ends[e] use w[e]."""

    @staticmethod
    def forward(ctx, x, w, ends, recipe, out_dtype):  # x [N, in], w [E, out, in]
        ctx.save_for_backward(x, w)
        ctx.ends, ctx.recipe = ends, recipe
        y = x.new_zeros(x.shape[0], w.shape[1], dtype=out_dtype)  # rows past ends[-1] stay zero
        for e, s, t in _spans(ends):
            if t > s:
                y[s:t] = _mm(x[s:t], w[e], TILE, recipe)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None  # an idle expert gets 0
        for e, s, t in _spans(ctx.ends):
            if t == s:
                continue
            if dx is not None:
                dx[s:t] = _mm(dy[s:t], w[e].t(), TILE, ctx.recipe)
            if dw is not None:
                dw[e] = _mm(dy[s:t].t(), x[s:t].t(), 1, ctx.recipe)
        return dx, dw, None, None, None


class _Fp8GroupedLinear:
    """Stands in for an experts module's `grouped_linear`; the original runs when disabled."""

    def __init__(self, original: Callable, recipe: _Recipe):
        self.original, self.recipe, self.fp8_enabled = original, recipe, True

    def __call__(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if not self.fp8_enabled:
            return self.original(x, w, offsets)
        if x.dim() != 2 or w.dim() != 3 or w.shape[2] != x.shape[1] or offsets.shape != (w.shape[0],):
            raise ValueError(f"grouped_linear wants x [N, in], w [E, out, in], offsets [E]; found "
                             f"{tuple(x.shape)}, {tuple(w.shape)}, {tuple(offsets.shape)}")
        if w.shape[1] % TILE or w.shape[2] % TILE:
            raise ValueError(f"FP8 grouped_linear needs expert dims that are multiples of {TILE}, "
                             f"found w {tuple(w.shape)}")
        ends = tuple(int(v) for v in offsets.tolist())
        if any(b < a for a, b in zip((0, *ends), ends)) or (ends and ends[-1] > x.shape[0]):
            raise ValueError(f"offsets must be non-decreasing row ends <= {x.shape[0]}, found {ends}")
        # x's dtype even under autocast, as torch's grouped_mm (not on autocast's op lists)
        # returns, so callers that index_add the result into x-typed buffers keep working
        with torch.autocast(x.device.type, enabled=False):
            return _Fp8GroupedFn.apply(x, w, ends, self.recipe, x.dtype)


def _is_routed_experts(module: nn.Module) -> bool:
    return hasattr(module, "grouped_linear") and all(hasattr(module, w) for w in ("w1", "w2", "w3"))


def _grouped_chain(module: nn.Module) -> list:
    """The instance-level grouped_linear wrappers of a module, outermost first (each keeps `.original`)."""
    chain, g = [], module.__dict__.get("grouped_linear")
    while g is not None and not hasattr(g, "__self__"):  # stop at the class's bound method
        chain.append(g)
        g = getattr(g, "original", None)
    return chain


@dataclass
class Fp8Report:
    converted: list[str] = field(default_factory=list)  # module names now computing in FP8
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) left as they were


def _skip_reason(name, module, is_experts, module_filter, skip_suffixes) -> str | None:
    if not is_experts and type(module) is not nn.Linear:
        return f"{type(module).__name__} subclasses nn.Linear; its forward may not be F.linear"
    if module._forward_hooks or module._forward_pre_hooks:
        return "has forward hooks (LoRA adapters?) that a swapped layer would lose; convert before adding them"
    if is_experts and _grouped_chain(module):
        return "its grouped_linear is already wrapped (LoRA?); convert to FP8 before adding adapters"
    for part in name.split("."):
        hit = next((s for s in skip_suffixes if part.endswith(s)), None)
        if hit:
            return f"name part {part!r} ends in {hit!r} (embedding/head/router stay high precision)"
    if module_filter is not None and not module_filter(name, module):
        return "rejected by module_filter"
    if is_experts:
        inter, dim = module.w1.shape[-2:]
        if inter % TILE or dim % TILE:
            return f"expert dims inter={inter}, dim={dim} are not multiples of {TILE}"
    elif module.in_features % TILE or module.out_features % TILE:
        return (f"in_features={module.in_features}, out_features={module.out_features} "
                f"are not multiples of {TILE}")
    return None


def convert_to_fp8(model: nn.Module, backend: str = "emulate",
                   module_filter: Callable[[str, nn.Module], bool] | None = None,
                   skip_suffixes: tuple[str, ...] = SKIP_SUFFIXES,
                   emulate_dtype: torch.dtype = torch.bfloat16) -> Fp8Report:
    """Switch model's linear layers and routed experts to FP8 in place; returns what was done.

    A module stays as it is when any dotted part of its name ends in one of skip_suffixes,
    when module_filter(name, module) returns False, or when its dims are not multiples of
    128. Modules converted earlier are left alone, so converting twice is harmless.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown FP8 backend {backend!r}; choose one of {BACKENDS}")
    if backend == "scaled_mm" and not torch.cuda.is_available():
        raise RuntimeError("FP8 backend 'scaled_mm' needs a CUDA GPU with FP8 (sm89+); on a CPU use "
                           "backend='emulate', which quantises identically")
    if type(model) is nn.Linear:
        raise ValueError("convert_to_fp8 replaces Linear layers inside a module; pass their parent, "
                         "or build Fp8Linear.from_linear(layer) yourself")
    recipe, report, swaps = _Recipe(backend, emulate_dtype), Fp8Report(), {}
    for name, module in model.named_modules():
        is_experts = _is_routed_experts(module)
        if isinstance(module, Fp8Linear) or any(isinstance(g, _Fp8GroupedLinear) for g in _grouped_chain(module)):
            continue
        if not (is_experts or isinstance(module, nn.Linear)):
            continue
        reason = _skip_reason(name, module, is_experts, module_filter, skip_suffixes)
        if reason:
            report.skipped.append((name, reason))
            continue
        report.converted.append(name)
        if is_experts:  # an instance attribute shadows the class's method; parameters untouched
            module.grouped_linear = _Fp8GroupedLinear(module.grouped_linear, recipe)
        else:
            swaps[id(module)] = Fp8Linear.from_linear(module, backend, emulate_dtype)
    # every path to a swapped layer, so a layer shared by two parents is swapped in both
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in swaps:
                setattr(parent, child_name, swaps[id(child)])
    return report


@contextlib.contextmanager
def fp8_disabled(model: nn.Module):
    """Run the converted modules of `model` in plain precision inside the block."""
    switches = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    switches += [g for m in model.modules() for g in _grouped_chain(m) if isinstance(g, _Fp8GroupedLinear)]
    before = [s.fp8_enabled for s in switches]
    for s in switches:
        s.fp8_enabled = False
    try:
        yield model
    finally:
        for s, enabled in zip(switches, before):
            s.fp8_enabled = enabled
