"""The captioner: timm vision encoder -> projector -> DeepSeek-style language model.

Sequence layout (DESIGN.md): `<bos> <image>*N <prompt> <caption> <eos>`. The `<image>`
placeholder ids are swapped for the projected patch embeddings before the LM runs,
so the LM never sees the placeholder's own embedding. The loss covers the caption
and `<eos>` only (the labels mask is built by the tokenizer), plus the MTP loss
weighted by `lm.mtp_lambda` and the optional sequence-wise balance loss.

`splice` and `caption_loss` are functions rather than methods so that a pipeline's first
and last stages (train/parallel/stages.py), which hold only some of the modules, run the
same code: the loss takes the target counts to divide by and the share of the batch's
sequences, so microbatch losses add up to the whole batch's.

The LM config has one owner, the language model (`self.lm.cfg`); `cfg.lm` reads it, and
setting `cfg` hands its `lm` section to the language model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

import lm
from mm.confidence import Calibration
from mm.config import MMConfig
from mm.projector import Projector
from vision import VisionEncoder


@dataclass
class CaptionLoss:
    loss: torch.Tensor  # what the optimiser minimises
    main: torch.Tensor
    mtp: torch.Tensor
    aux: torch.Tensor


def splice(embeds: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor,
           image_token_id: int) -> torch.Tensor:
    """Token embeddings [B, T, D] with every `<image>` position replaced, in order, by an image token."""
    is_image = input_ids == image_token_id
    n = int(is_image.sum())
    if n != image_embeds.shape[0] * image_embeds.shape[1]:
        raise ValueError(
            f"the batch holds {n} <image> tokens but the encoder produced "
            f"{image_embeds.shape[0]} x {image_embeds.shape[1]}; each sequence needs exactly "
            f"{image_embeds.shape[1]} <image> tokens"
        )
    return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))


def caption_loss(logits: torch.Tensor, mtp_logits: list[torch.Tensor], aux: torch.Tensor | None,
                 labels: torch.Tensor, mtp_lambda: float, counts: list[torch.Tensor] | None = None,
                 share: float = 1.0) -> CaptionLoss:
    """Main next-token loss + MTP loss (DeepSeek-V3 eq. 25) + balance loss. Cross-entropies are
    divided by `counts` (lm.target_counts of the whole batch; default: of these labels), the balance
    loss (a mean over sequences) weighted by `share`, these rows' fraction of the batch."""
    counts = lm.target_counts(labels, len(mtp_logits)) if counts is None else counts
    main = lm.ce_sum(logits[:, :-1], labels[:, 1:]) / counts[0]
    mtp = torch.zeros((), device=main.device)
    if mtp_logits:
        mtp, _ = lm.mtp_loss(mtp_logits, labels, mtp_lambda, counts)
    aux = (aux.sum() * share).to(main.dtype) if aux is not None else torch.zeros((), device=main.device)
    return CaptionLoss(loss=main + mtp + aux, main=main, mtp=mtp, aux=aux)


def trains_mtp(cfg: lm.LMConfig) -> bool:
    """Whether the loss has an MTP term (and so needs the spliced input embeddings)."""
    return cfg.num_nextn_predict_layers > 0 and cfg.mtp_lambda > 0


def build_vision(cfg: MMConfig) -> VisionEncoder:
    v = cfg.vision
    return VisionEncoder(
        v.model_name, image_size=v.image_size, feature_layer=v.feature_layer,
        pretrained=v.pretrained, pretrained_file=v.pretrained_file, model_kwargs=v.model_kwargs,
        freeze=v.freeze, unfreeze_last=v.unfreeze_last, grad_checkpointing=v.grad_checkpointing,
    )


class CaptionModel(nn.Module):
    def __init__(self, cfg: MMConfig, image_token_id: int, vision: VisionEncoder | None = None,
                 language_model: lm.Transformer | None = None):
        super().__init__()
        self._cfg = cfg
        self.image_token_id = image_token_id
        self.vision = vision if vision is not None else build_vision(cfg)
        p = cfg.projector
        self.projector = Projector(
            self.vision.out_dim, cfg.lm.hidden_size, grid=self.vision.grid,
            pixel_shuffle=p.pixel_shuffle, hidden_mult=p.hidden_mult, pos_embed=p.pos_embed,
        )
        self.lm = language_model if language_model is not None else lm.Transformer(cfg.lm)
        self.lm.cfg = cfg.lm
        self.calibration: Calibration | None = None  # image familiarity statistics (mm/confidence.py)

    @property
    def cfg(self) -> MMConfig:
        if self._cfg.lm is not self.lm.cfg:  # the language model's config changed: it owns that part
            self._cfg = dataclasses.replace(self._cfg, lm=self.lm.cfg)
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: MMConfig) -> None:
        self._cfg = cfg
        self.lm.cfg = cfg.lm

    @property
    def num_image_tokens(self) -> int:
        return self.projector.num_tokens

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> projected image tokens [B, N, d_lm]."""
        return self.projector(self.vision(images))

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, 3, H, W] -> (projected image tokens [B, N, d_lm], familiarity [B] or None when the
        model has no calibration); one encoder pass serves both."""
        features = self.vision(images)
        familiarity = self.calibration.familiarity(features) if self.calibration is not None else None
        return self.projector(features), familiarity

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with every `<image>` position replaced, in order, by an image token."""
        return splice(self.lm.embed(input_ids), input_ids, image_embeds, self.image_token_id)

    def forward(self, images, input_ids, attention_mask=None, labels=None):
        embeds = self.embed(input_ids, self.encode_images(images))
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, return_hidden=True)
        if labels is None:
            return out
        return self.loss(out, embeds, attention_mask, labels)

    def loss(self, out, embeds, attention_mask, labels) -> CaptionLoss:
        cfg = self.lm.cfg
        mtp_logits = self.lm.mtp_logits(out.hidden, embeds, attention_mask) if trains_mtp(cfg) else []
        return caption_loss(out.logits, mtp_logits, out.aux_loss, labels, cfg.mtp_lambda)
