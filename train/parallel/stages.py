"""Cutting a CaptionModel into pipeline stages, and the loss each microbatch contributes.

Stage 0 runs the vision encoder, the projector, the `<image>` splice and the first LM
layers; middle stages run LM layers; the last stage runs the remaining layers, the final
norm, the head and the MTP modules. Between stages travel plain tensors, as
torch.distributed.pipelining requires: the hidden state [b, T, D], the spliced input
embeddings [b, T, D] (only when MTP is trained: depth k reads the embedding of token
i + k, image tokens included, and its gradient must reach the embedding table and the
projector exactly as in the unpipelined model) and the running balance loss [1]. The
attention mask is a keyword input that the schedule hands to every stage, so each stage
rebuilds positions, mask and rotary tables as `Transformer.forward` does: the numbers
are those of the unpipelined model.

Stages hold the CaptionModel's own submodules, not copies. `RankParts` collects those of
one rank under the CaptionModel's names (`lm.layers.5.attn...`), so its state dict is a
slice of the full one and checkpoints move freely between pipelined and plain runs.

The first stage splices the image tokens with the model's own `mm.model.splice`, and the
last stage's loss is the model's own `mm.model.caption_loss`, given the whole batch's target
counts and the microbatch's share of the sequences: the microbatch losses add up to
`CaptionModel.loss` of the batch, and the schedule must not rescale gradients. BatchNorm
(if the encoder has any) is the exception: it normalises over a microbatch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

import lm
from lm.model import positions_and_mask
from mm.model import CaptionModel, caption_loss, splice, trains_mtp

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved1f1b": ScheduleInterleaved1F1B,
             "zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}
TWO_STAGES_PER_RANK = ("interleaved1f1b", "zbv", "dualpipev")
V_SHAPED = ("zbv", "dualpipev")


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule in TWO_STAGES_PER_RANK else 1


def rank_stages(schedule: str, pp_rank: int, pp_size: int) -> list[int]:
    """Stage indices a pipeline rank runs, ascending: V schedules fold the pipeline back
    (r and 2P-1-r), interleaved 1F1B loops it (r and r+P)."""
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    if schedule in TWO_STAGES_PER_RANK:
        return [pp_rank, pp_rank + pp_size]
    return [pp_rank]


def split_layers(num_layers: int, pp_size: int, schedule: str) -> list[range]:
    """The LM layers of each stage: an even split, every stage at least one layer."""
    n = pp_size * stages_per_rank(schedule)
    if num_layers < n or num_layers % n:
        raise ValueError(
            f"{num_layers} LM layers do not split evenly over {n} pipeline stages "
            f"({pp_size} ranks x {stages_per_rank(schedule)} stage(s) per rank for schedule {schedule!r}); "
            f"set model.lm.num_hidden_layers to a multiple of {n} or change pipeline.stages/schedule"
        )
    per = num_layers // n
    return [range(i * per, (i + 1) * per) for i in range(n)]


class Stage(nn.Module):
    """One pipeline stage of a CaptionModel. Inputs: (images, input_ids) on stage 0, else
    (h, [embeds], aux); outputs (h, [embeds], aux), on the last stage (logits, *mtp_logits, aux)."""

    # Training-time MTP is Transformer.mtp_logits; it reads only .cfg, .mtp, .rope and .head,
    # which the last stage holds, so the methods are borrowed rather than rewritten.
    mtp_logits = lm.Transformer.mtp_logits
    mtp_step = lm.Transformer.mtp_step

    def __init__(self, model: CaptionModel, layers: range, first: bool, last: bool,
                 autocast: torch.dtype | None = None):
        super().__init__()
        self.first, self.last, self.autocast = first, last, autocast
        self.cfg = model.cfg.lm
        self.carry = trains_mtp(model.cfg.lm)
        self.layers = nn.ModuleList(model.lm.layers[i] for i in layers)
        self.rope = model.lm.rope
        if first:
            self.vision, self.projector, self.embed = model.vision, model.projector, model.lm.embed
            self.image_token_id = model.image_token_id
        if last:
            self.norm, self.head, self.mtp = model.lm.norm, model.lm.head, model.lm.mtp

    def forward(self, *inputs: torch.Tensor, attention_mask: torch.Tensor):
        dtype = self.autocast
        with torch.autocast(attention_mask.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if self.first:
                images, input_ids = inputs
                h = embeds = splice(self.embed(input_ids), input_ids, self.projector(self.vision(images)),
                                    self.image_token_id)
                aux = h.new_zeros(1, dtype=torch.float32)
            else:
                h, embeds, aux = inputs if self.carry else (inputs[0], None, inputs[1])
                if embeds is not None and not self.last:
                    embeds = embeds.clone()  # schedules detach outputs in place: not the input, nor a view
            b, t = h.shape[:2]
            positions, mask, valid = positions_and_mask(attention_mask, 0, b, t, h.device)
            cos, sin = self.rope(positions)
            for layer in self.layers:
                h, a, _ = layer(h, cos, sin, mask, None, valid)
                aux = aux + a
            if not self.last:
                return (h, embeds, aux) if self.carry else (h, aux)
            mtp = self.mtp_logits(h, embeds, attention_mask) if self.carry else []
            return (self.head(self.norm(h)), *mtp, aux)


class RankParts(nn.Module):
    """The CaptionModel submodules one pipeline rank holds, under the CaptionModel's names."""

    def __init__(self, model: CaptionModel, stages: list[Stage], layer_ids: list[int]):
        super().__init__()
        self.cfg = model.cfg
        part = nn.Module()
        if any(s.first for s in stages):
            self.vision, self.projector, part.embed = model.vision, model.projector, model.lm.embed
        part.layers = nn.ModuleDict({str(i): model.lm.layers[i] for i in sorted(layer_ids)})
        if any(s.last for s in stages):
            part.norm, part.head, part.mtp = model.lm.norm, model.lm.head, model.lm.mtp
        part.rope = model.lm.rope
        self.lm = part


class MicrobatchLoss:
    """The schedule's loss_fn: `caption_loss` of each microbatch, normalised by the whole batch.

    `start(labels)` must see the whole batch's labels before the schedule runs; `totals(n)`
    returns the (loss, main, mtp, aux) sums of the last n microbatches (the schedule may call
    the loss once more when it first infers the stage shapes).
    """

    def __init__(self, cfg: lm.LMConfig):
        self.depths = cfg.mtp_loss_depths if trains_mtp(cfg) else 0
        self.mtp_lambda = cfg.mtp_lambda
        self.records: list[torch.Tensor] = []
        self.scale = 1.0

    def start(self, labels: torch.Tensor, scale: float = 1.0) -> None:
        self.batch, self.scale, self.records = labels.shape[0], scale, []
        self.counts = lm.target_counts(labels, self.depths)

    def __call__(self, output: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        logits, *mtp_logits, aux = output
        out = caption_loss(logits, mtp_logits, aux, labels, self.mtp_lambda, self.counts,
                           share=labels.shape[0] / self.batch)
        self.records.append(torch.stack([out.loss, out.main, out.mtp, out.aux]).detach())
        return out.loss * self.scale

    def totals(self, n: int) -> torch.Tensor:
        if len(self.records) < n:
            raise RuntimeError(f"expected {n} microbatch losses on the last stage, got {len(self.records)}")
        return torch.stack(self.records[-n:]).sum(0)
