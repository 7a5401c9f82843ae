"""A timm backbone as a patch-token encoder: images [B, 3, H, W] -> tokens [B, N, D].

Any timm model works. Features come from `forward_intermediates(indices=[k],
output_fmt="NCHW")`, which ViTs (SigLIP, EVA, ...) and CNNs (ResNet, ConvNeXt, ...)
share in timm 1.0: ViTs drop their prefix tokens (class, registers) and fold the
patches into a map, CNNs return their stage output. The map [B, D, h, w] is
flattened row-major, so token index = row * w + col. Blocks after the chosen
layer and the classifier head are pruned: they would cost compute and hold
parameters that never get a gradient (which DDP rejects). Models without
`forward_intermediates` fall back to timm's `features_only` wrapper.

`feature_layer=-1` is the model's final feature map, final norm included (what
`forward_features` returns); earlier layers are the raw block outputs.

Freezing keeps frozen parts in eval mode even under `.train()`, so BatchNorm
statistics of a frozen ResNet do not drift with the captioning data.
"""

from __future__ import annotations

from pathlib import Path

import timm
import timm.data
import torch
from torch import nn

_RESERVED_KWARGS = ("pretrained", "pretrained_cfg_overlay", "features_only", "num_classes", "global_pool")


def _create(model_name: str, image_size: int | None, **kwargs) -> nn.Module:
    """timm.create_model, passing `img_size` only to models that take it (ViTs; CNNs take any size)."""
    if image_size is None or "img_size" in kwargs:
        return timm.create_model(model_name, **kwargs)
    try:
        return timm.create_model(model_name, img_size=image_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        return timm.create_model(model_name, **kwargs)


def _build(model_name: str, image_size: int | None, feature_layer: int, kwargs: dict):
    """-> (model, absolute feature index or None for a features_only model, final norm applied)."""
    model = _create(model_name, image_size, num_classes=0, global_pool="", **kwargs)
    if not _has_intermediates(model):
        model = _create(model_name, image_size, features_only=True, out_indices=(feature_layer,), **kwargs)
        return model, None, False
    n_levels = len(model.feature_info)
    if not -n_levels <= feature_layer < n_levels:
        raise ValueError(f"feature_layer={feature_layer} is out of range for {model_name} ({n_levels} levels)")
    take = feature_layer % n_levels
    final_norm = take == n_levels - 1
    if hasattr(model, "prune_intermediate_layers"):
        model.prune_intermediate_layers([take], prune_norm=not final_norm, prune_head=True)
    return model, take, final_norm


def _has_intermediates(model: nn.Module) -> bool:
    return hasattr(model, "forward_intermediates")


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The model's sequence of blocks, for `unfreeze_last`: ViT `blocks`, `stages`, or ResNet layer1..4."""
    if isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)):
        name, blocks = "blocks", list(model.blocks)
    elif isinstance(getattr(model, "stages", None), (nn.Sequential, nn.ModuleList)):
        name, blocks = "stages", list(model.stages)
    elif hasattr(model, "layer1"):
        name = "layer1..layer4"
        blocks = [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
    else:
        children = [n for n, _ in model.named_children()]
        raise ValueError(
            f"unfreeze_last needs a model with `blocks`, `stages` or `layer1..layer4`; "
            f"{type(model).__name__} has children {children}"
        )
    # pruned stages are left empty (ResNet) and hold nothing to train
    return name, [b for b in blocks if any(True for _ in b.parameters())]


class VisionEncoder(nn.Module):
    """Wraps a timm model; forward(images [B, 3, H, W]) -> patch tokens [B, h*w, out_dim].

    `image_size` defaults to the model's pretrained size; ViTs are built for it
    (`img_size=`), CNNs take any size. `pretrained_file` loads local weights and
    never downloads; `pretrained=True` alone uses timm's weights from the HF cache.
    `freeze` + `unfreeze_last=N` trains only the last N blocks (ViT `blocks`,
    `stages`, or ResNet layer1..4; a ViT's final norm goes with them).
    `channels_last` converts weights and inputs to NHWC.
    """

    def __init__(
        self,
        model_name: str,
        *,
        image_size: int | None = None,
        feature_layer: int = -1,
        pretrained: bool = False,
        pretrained_file: str = "",
        model_kwargs: dict | None = None,
        freeze: bool = False,
        unfreeze_last: int = 0,
        grad_checkpointing: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        kwargs = dict(model_kwargs or {})
        clash = sorted(k for k in _RESERVED_KWARGS if k in kwargs)
        if clash:
            raise ValueError(f"model_kwargs may not set {clash}: VisionEncoder sets them itself")
        if unfreeze_last < 0 or (unfreeze_last and not freeze):
            raise ValueError(f"unfreeze_last={unfreeze_last} needs freeze=True and a value >= 0")
        if pretrained_file:
            path = Path(pretrained_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"vision weights file not found: {path} (pretrained_file for {model_name})")
            # a file overrides every other source, so timm never goes to the network
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path), source=""))
        elif pretrained:
            kwargs["pretrained"] = True

        self.model_name = model_name
        self.feature_layer = feature_layer
        try:
            model, self._take, self._final_norm = _build(model_name, image_size, feature_layer, kwargs)
        except OSError as e:  # huggingface_hub's "not in the local cache" is a FileNotFoundError
            if not pretrained or pretrained_file:
                raise
            raise RuntimeError(
                f"could not load timm's pretrained weights for {model_name!r}: they must be in the local "
                f"Hugging Face cache (or pass pretrained_file=): {e}"
            ) from e
        self._features_only = self._take is None
        self.model = model
        self.image_size = image_size or int(timm.data.resolve_model_data_config(model)["input_size"][-1])
        self._shape: tuple[tuple[int, int], int] | None = None  # (grid, out_dim), found on first use
        self._channels_last = False
        self._frozen: list[nn.Module] = []

        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if freeze:
            self.freeze(unfreeze_last)
        if channels_last:
            self.to_channels_last()

    # --- freezing -----------------------------------------------------------------

    def freeze(self, unfreeze_last: int = 0) -> None:
        """Stop training the encoder, except its last `unfreeze_last` blocks."""
        self.model.requires_grad_(False)
        trainable: list[nn.Module] = []
        if unfreeze_last:
            name, blocks = find_blocks(self.model)
            if unfreeze_last > len(blocks):
                raise ValueError(
                    f"unfreeze_last={unfreeze_last} but {self.model_name} has {len(blocks)} blocks ({name})"
                )
            trainable = blocks[-unfreeze_last:]
            # a ViT's final norm sits after its last block: train it with the blocks that feed it
            norm = getattr(self.model, "norm", None)
            if name == "blocks" and isinstance(norm, nn.Module) and self._final_norm:
                trainable.append(norm)
        for module in trainable:
            module.requires_grad_(True)
        self.refresh_frozen()

    def refresh_frozen(self) -> None:
        """Hold in eval mode (normalisation statistics, dropout) the subtrees that have no trainable
        parameter; call again after parameters were added or their requires_grad changed."""
        self._frozen = []
        self._collect_frozen(self.model)
        self.train(self.training)

    def _collect_frozen(self, module: nn.Module) -> None:
        """The largest subtrees with no trainable parameter (and some state), to hold in eval mode."""
        if not any(p.requires_grad for p in module.parameters()):
            if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
                self._frozen.append(module)
            return
        for child in module.children():
            self._collect_frozen(child)

    def train(self, mode: bool = True) -> VisionEncoder:
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    # --- forward ------------------------------------------------------------------

    def to_channels_last(self) -> VisionEncoder:
        """NHWC weights and inputs: several times faster for CNNs on CPUs with oneDNN (and on GPUs)."""
        self.model.to(memory_format=torch.channels_last)
        self._channels_last = True
        return self

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> feature map [B, D, h, w]."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected normalised float images, got dtype {images.dtype}")
        weight = next(self.model.parameters())
        if images.dtype != weight.dtype and not torch.is_autocast_enabled(images.device.type):
            images = images.to(weight.dtype)  # e.g. a bf16 model fed fp32 pixels
        if self._channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self._features_only:
            return self.model(images)[0]
        return self.model.forward_intermediates(
            images, indices=[self._take], norm=self._final_norm, stop_early=True,
            output_fmt="NCHW", intermediates_only=True,
        )[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.feature_map(images)  # [B, D, h, w]
        return fmap.flatten(2).transpose(1, 2)  # [B, h*w, D], token = row * w + col

    # --- shapes and preprocessing ---------------------------------------------------

    def _probe(self) -> tuple[tuple[int, int], int]:
        """Run one blank image to learn the map size: exact for any stride and padding arithmetic."""
        if self._shape is None:
            modes = [m.training for m in self.modules()]
            self.eval()  # BatchNorm in train mode would update its statistics on the probe
            weight = next(self.model.parameters())
            size = self.image_size
            with torch.no_grad():
                fmap = self.feature_map(torch.zeros(1, 3, size, size, device=weight.device, dtype=weight.dtype))
            for m, mode in zip(self.modules(), modes):
                m.training = mode
            self._shape = ((int(fmap.shape[2]), int(fmap.shape[3])), int(fmap.shape[1]))
        return self._shape

    @property
    def grid(self) -> tuple[int, int]:
        return self._probe()[0]

    @property
    def out_dim(self) -> int:
        return self._probe()[1]

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def data_config(self) -> dict:
        """timm's preprocessing (mean, std, interpolation) for this model, at `image_size`."""
        size = self.image_size
        return timm.data.resolve_data_config(args={"input_size": (3, size, size)}, model=self.model)
