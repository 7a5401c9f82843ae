"""The whole captioner's config: vision encoder, projector, language model, task prompts.

One `MMConfig` is saved as a checkpoint's `config.json`. Named presets live in
`PRESETS`; `tiny` is the CPU default, `small` is sized for one GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lm.config import ConfigBase, ConfigError, LMConfig, check_ranges

DEFAULT_TASKS = {
    "caption": "Caption:",
    "describe": "Describe:",
    "caption_zh": "标题：",
    "describe_zh": "描述：",
}
TASKS = tuple(DEFAULT_TASKS)  # the task list, defined here once: readers, scenes and the trainer use it


@dataclass
class VisionConfig(ConfigBase):
    model_name: str = "resnet18"  # any timm model name
    pretrained: bool = False  # timm's own weights (needs them in the local cache)
    pretrained_file: str = ""  # local weights file, loaded through pretrained_cfg_overlay
    image_size: int = 128
    feature_layer: int = -1  # which block's output: -1 the last, -2 the one before, ...
    model_kwargs: dict = field(default_factory=dict)  # passed to timm.create_model
    freeze: bool = False
    unfreeze_last: int = 0  # with freeze: train only the last N blocks
    grad_checkpointing: bool = False

    def __post_init__(self):
        check_ranges("VisionConfig", [(self.image_size >= 1, "image_size must be >= 1", self.image_size),
                                      (self.unfreeze_last >= 0, "unfreeze_last must be >= 0", self.unfreeze_last)])


@dataclass
class ProjectorConfig(ConfigBase):
    pixel_shuffle: bool = False  # 2x2 token reduction (DeepSeek-VL2) before the MLP
    hidden_mult: int = 1  # MLP width = hidden_mult * LM width
    pos_embed: bool = True  # learned position embedding on the image tokens

    def __post_init__(self):
        check_ranges("ProjectorConfig", [(self.hidden_mult >= 1, "hidden_mult must be >= 1", self.hidden_mult)])


@dataclass
class MMConfig(ConfigBase):
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    tasks: dict = field(default_factory=lambda: dict(DEFAULT_TASKS))  # task name -> prompt text
    max_text_len: int = 64  # prompt + caption tokens per sample
    meta: dict = field(default_factory=dict)  # provenance: recipe, commit, notes

    def __post_init__(self):
        bad = {k: v for k, v in self.tasks.items() if not (isinstance(k, str) and k and isinstance(v, str))}
        check_ranges("MMConfig", [(bool(self.tasks), "tasks must name at least one task", self.tasks),
                                  (not bad, "tasks must map task names to prompt strings", bad),
                                  (self.max_text_len >= 1, "max_text_len must be >= 1", self.max_text_len)])

    def with_tasks(self, add: dict) -> MMConfig:
        """This config with the prompts of `add` (a training config's add_tasks); a task it already has
        keeps its prompt, or must be given the same one."""
        clash = {k: (self.tasks[k], v) for k, v in add.items() if k in self.tasks and self.tasks[k] != v}
        if clash:
            raise ConfigError(f"add_tasks: {sorted(clash)} already have other prompts in the model "
                              f"(model, add_tasks): {clash}")
        return self.replace(tasks={**self.tasks, **add}) if add else self

    def prompt(self, task: str) -> str:
        if task not in self.tasks:
            raise ConfigError(f"unknown task {task!r}; this model knows {sorted(self.tasks)}")
        return self.tasks[task]


PRESETS: dict[str, MMConfig] = {
    # CPU: a slim ResNet trunk and a 4-layer MLA/MoE decoder, a few million parameters.
    "tiny": MMConfig(
        vision=VisionConfig(model_name="resnet18", image_size=128),
        projector=ProjectorConfig(pixel_shuffle=False),
        lm=LMConfig(),
    ),
    # One GPU: a ViT encoder and a wider, deeper MoE decoder.
    "small": MMConfig(
        vision=VisionConfig(model_name="vit_small_patch16_224", image_size=224),
        projector=ProjectorConfig(pixel_shuffle=True, hidden_mult=2),
        lm=LMConfig(
            vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=2048, max_position_embeddings=2048, q_lora_rank=384,
            kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
            n_routed_experts=32, n_shared_experts=2, num_experts_per_tok=4,
            moe_intermediate_size=384, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        ),
        max_text_len=256,
    ),
}


def preset(name: str) -> MMConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return MMConfig.from_dict(dataclasses.asdict(PRESETS[name]))
