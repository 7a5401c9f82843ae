"""LoRA (Hu et al. 2021) for `mm finetune --stage lora`: W x + (alpha / r) B A dropout(x), W frozen.

A conversion pass like FP8's: `apply_lora` adds adapters from outside, so the model code
stays as it is and the base weights keep their names (`lm.layers.0.attn.wkv_b.weight`);
an adapter is a child named `lora` (`...wkv_b.lora.A`, `...ffn.experts.lora.w1.B`). B starts
at zero, so a freshly adapted model computes exactly what the base model does.

- Linear and Conv2d layers get a forward hook that adds the low-rank update to the layer's
  output; the layer itself, plain or FP8 (train/fp8/linear.py), is untouched. FP8 conversion comes
  first (the trainer's order: fp8 -> lora -> compile -> shard), so the frozen base GEMMs are
  quantised and the adapters stay out of FP8: their products run as unconverted layers' do
  (linear ones in the autocast dtype, bf16; the experts' in their input's dtype).
- Routed experts (stacked w1/w3 [E, inter, D], w2 [E, D, inter]) get per-expert A [E, r, in]
  and B [E, out, r]; their `grouped_linear` is wrapped so the update takes the same grouped
  dispatch as the base GEMM: grouped(x, W) + s * grouped(grouped(x, A), B). No [E, out, in]
  delta is ever formed while training.
- Anything that reads weights directly (MLA's absorbed decode path, lm.Decoder) does not see
  unmerged adapters, so inference runs on merged weights: `merged_state_dict` for exports,
  `merge_lora` in place.

Why not the `peft` library: its layer wrappers move the base weight to `<layer>.base_layer.weight`,
so a LoRA run's checkpoints would stop matching the Captioner's key layout that resume, the
merged export and FP8 conversion rely on; and its parameter targets (peft 0.21 `ParamWrapper`,
for stacked expert weights) fold W + B A into the whole [E, out, in] parameter on every forward
through a parametrization, one wrapper per parameter and without dropout, which would also
hand the adapter to the FP8 grouped GEMM instead of keeping it in bf16.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lm.config import ConfigError
from train.config import LoRAConfig

EXPERT_WEIGHTS = ("w1", "w2", "w3")


class LowRank(nn.Module):
    """The update of a Linear [out, in]: A [r, in] (Kaiming-uniform, as nn.Linear), B [out, r] = 0."""

    def __init__(self, in_features: int, out_features: int, cfg: LoRAConfig):
        super().__init__()
        self.scale = cfg.scale
        self.A = nn.Parameter(torch.empty(cfg.rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, cfg.rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scale

    def delta(self) -> torch.Tensor:  # [out, in]
        return (self.B.float() @ self.A.float()) * self.scale


class ConvLowRank(LowRank):
    """The update of a Conv2d [out, in, kh, kw]: A is a conv to r channels with the base's kernel,
    stride, padding and dilation; B a 1x1 conv back to out channels."""

    def __init__(self, conv: nn.Conv2d, cfg: LoRAConfig):
        kh, kw = conv.kernel_size
        super().__init__(conv.in_channels * kh * kw, conv.out_channels, cfg)
        self.kernel, self.conv_args = (kh, kw), (conv.stride, conv.padding, conv.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.A.view(self.A.shape[0], -1, *self.kernel)
        h = F.conv2d(self.dropout(x), a.to(x.dtype), None, *self.conv_args)
        return F.conv2d(h, self.B[..., None, None].to(h.dtype)) * self.scale

    def delta(self) -> torch.Tensor:  # [out, in, kh, kw]
        return super().delta().view(self.B.shape[0], -1, *self.kernel)


class ExpertLowRank(nn.Module):
    """Per-expert updates of a stacked weight [E, out, in]: A [E, r, in], B [E, out, r] = 0."""

    def __init__(self, weight: torch.Tensor, cfg: LoRAConfig):
        super().__init__()
        e, out_features, in_features = weight.shape
        self.scale = cfg.scale
        self.A = nn.Parameter(torch.empty(e, cfg.rank, in_features, device=weight.device))
        self.B = nn.Parameter(torch.zeros(e, out_features, cfg.rank, device=weight.device))
        for a in self.A:  # each expert's A as nn.Linear would initialise it
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def delta(self) -> torch.Tensor:  # [E, out, in]
        return torch.bmm(self.B.float(), self.A.float()) * self.scale


class LoRAGroupedLinear:
    """Stands in for an experts module's `grouped_linear`: the base GEMM (plain or FP8, whatever was
    there, kept as `original`) plus the low-rank update through the class's own grouped GEMM."""

    def __init__(self, experts: nn.Module, original):
        self.experts, self.original = experts, original

    def __call__(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        y = self.original(x, w, offsets)
        name = next((n for n in EXPERT_WEIGHTS if w is getattr(self.experts, n)), None)
        if name is None or name not in self.experts.lora:
            return y
        lora, grouped = self.experts.lora[name], type(self.experts).grouped_linear
        h = grouped(self.experts, lora.dropout(x), lora.A, offsets)  # [M, r]
        return y + grouped(self.experts, h, lora.B, offsets).to(y.dtype) * lora.scale


def _add_update(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + module.lora(args[0]).to(out.dtype)


def adapt_layer(layer: nn.Module, cfg: LoRAConfig) -> None:
    """Give a Linear (plain or FP8) or a Conv2d an adapter whose update is added to its output."""
    adapter = ConvLowRank(layer, cfg) if isinstance(layer, nn.Conv2d) else LowRank(
        layer.in_features, layer.out_features, cfg)
    layer.lora = adapter.to(layer.weight.device)
    layer.lora.hook = layer.register_forward_hook(_add_update)


def adapt_experts(experts: nn.Module, weights: list[str], cfg: LoRAConfig) -> None:
    """Give an experts module per-expert adapters on the named stacked weights (w1, w2, w3)."""
    if "lora" not in experts._modules:
        experts.lora = nn.ModuleDict()
        # an instance attribute shadows the class's method; whatever was there (FP8's) runs the base GEMM
        experts.grouped_linear = LoRAGroupedLinear(experts, experts.grouped_linear)
    for w in weights:
        experts.lora[w] = ExpertLowRank(getattr(experts, w), cfg)


def is_experts(module: nn.Module) -> bool:
    return hasattr(module, "grouped_linear") and all(
        isinstance(getattr(module, w, None), nn.Parameter) and getattr(module, w).dim() == 3 for w in EXPERT_WEIGHTS)


def _matches(name: str, patterns: list[str]) -> str | None:
    last = name.rsplit(".", 1)[-1]
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p)), None)


@dataclass
class LoRAReport:
    adapted: list[str] = field(default_factory=list)  # module names (experts: name.w1 ...)
    unused_patterns: list[str] = field(default_factory=list)
    parameters: int = 0

    def summary(self) -> str:
        unused = f"; patterns that matched nothing: {self.unused_patterns}" if self.unused_patterns else ""
        return f"lora: {len(self.adapted)} adapted weights, {self.parameters / 1e6:.3f}M adapter parameters{unused}"


def lm_targets(model: nn.Module, cfg: LoRAConfig) -> list[tuple[str, nn.Module, str | None]]:
    """(full name, module, expert weight or None) of the LM's layers to adapt."""
    found, lm_cfg = [], model.cfg.lm
    mtp_in_loss = len(model.lm.mtp) > 0 and lm_cfg.mtp_lambda > 0 and lm_cfg.mtp_loss_depths > 0
    for name, m in model.lm.named_modules():
        if name.startswith("mtp.") and not (cfg.mtp and mtp_in_loss and not cfg.train_mtp):
            continue  # unused adapters would stall DDP; a fully trained MTP needs none
        if isinstance(m, nn.Linear) and _matches(name, cfg.targets):
            found.append((f"lm.{name}", m, None))
        elif cfg.experts and is_experts(m):
            found += [(f"lm.{name}", m, w) for w in EXPERT_WEIGHTS if _matches(f"{name}.{w}", cfg.targets)]
    return found


def vision_targets(model: nn.Module, cfg: LoRAConfig) -> list[tuple[str, nn.Module, None]]:
    """The encoder's Linear and (ungrouped) Conv2d layers inside its blocks that match vision_targets."""
    from vision.encoder import find_blocks

    if not cfg.vision:
        return []
    _, blocks = find_blocks(model.vision.model)
    inside = {id(m) for b in blocks for m in b.modules()}
    return [(f"vision.model.{n}", m, None) for n, m in model.vision.model.named_modules()
            if id(m) in inside and _matches(n, cfg.vision_targets)
            and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))]


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> LoRAReport:
    """Add adapters to a CaptionModel in place (after any FP8 conversion); base weights are untouched."""
    in_lm, in_vision = lm_targets(model, cfg), vision_targets(model, cfg)
    if not in_lm:
        names = sorted({n.rsplit(".", 1)[-1] + (f".{w}" if w else "") for n, _, w in lm_targets(model, LoRAConfig(targets=["*"]))})
        raise ConfigError(f"lora.targets {cfg.targets} match no layer of the language model; its layers are "
                          f"named like {names}")
    if cfg.vision and not in_vision:
        raise ConfigError(f"lora.vision_targets {cfg.vision_targets} match no Linear or Conv2d layer inside the "
                          f"encoder's blocks ({type(model.vision.model).__name__})")
    targets = in_lm + in_vision
    report = LoRAReport()
    for name, m, weight in targets:
        existing = m._modules.get("lora")
        if existing is not None and (weight is None or weight in existing):
            raise ValueError(f"{name} already has a LoRA adapter{f' on {weight}' if weight else ''}")
        report.adapted.append(f"{name}.{weight}" if weight else name)
        if weight is None:
            adapt_layer(m, cfg)
        else:
            adapt_experts(m, [weight], cfg)
    if cfg.vision:
        model.vision.refresh_frozen()  # adapted blocks train (dropout on); frozen statistics stay held
    report.parameters = sum(p.numel() for n, p in model.named_parameters() if ".lora." in n)
    subjects = [n.removeprefix("lm.") + (f".{w}" if w else "") for n, _, w in in_lm]  # what the patterns matched
    report.unused_patterns = [p for p in cfg.targets if not any(_matches(n, [p]) for n in subjects)]
    return report


def adapted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer or experts module that carries adapters."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m._modules.get("lora"), (LowRank, nn.ModuleDict))]


def _deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """{weight's state-dict key: its merged update} for every adapter of the model."""
    out = {}
    for name, m in adapted(model):
        if isinstance(m.lora, LowRank):
            out[f"{name}.weight"] = m.lora.delta()
        else:
            out.update({f"{name}.{w}": a.delta() for w, a in m.lora.items()})
    return out


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model the adapters make: W + s B A under the base keys, no adapter
    keys (so it loads with Captioner.from_pretrained). A model without adapters gives its own."""
    state = {k: v for k, v in model.state_dict().items() if ".lora." not in k}
    for key, delta in _deltas(model).items():
        state[key] = (state[key].float() + delta).to(state[key].dtype)
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and remove it: the model is plain again."""
    for key, delta in _deltas(model).items():
        w = model.get_parameter(key)
        w.copy_((w.float() + delta).to(w.dtype))
    for _, m in adapted(model):
        if isinstance(m.lora, LowRank):
            m.lora.hook.remove()
        else:
            wrapper = m.__dict__.pop("grouped_linear")
            if not _is_bound_method_of(wrapper.original, m):
                m.grouped_linear = wrapper.original  # e.g. FP8's, which was there first
        del m.lora
    return model


def _is_bound_method_of(fn, module) -> bool:
    return getattr(fn, "__self__", None) is module

