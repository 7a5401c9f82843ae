"""The DeepSeek-V3-style language model: MLA, DeepSeekMoE, MTP, and its decode cache."""

from lm.attention import MLA
from lm.cache import KVCache, LayerCache
from lm.config import ConfigError, LMConfig
from lm.decode import DecodeOutput, Decoder, DecodeSteps, Draft, MTPLayer
from lm.hf import load_hf, save_hf
from lm.loss import IGNORE_INDEX, ce_sum, target_counts
from lm.model import Block, LMOutput, Transformer
from lm.moe import (
    MLP,
    Gate,
    MoE,
    RoutedExperts,
    load_stats,
    max_over_mean,
    moe_layers,
    route,
    router_loads,
    update_router_bias,
)
from lm.mtp import MTPModule, mtp_loss
from lm.norm import RMSNorm
from lm.reference import Reference
from lm.rope import RotaryEmbedding, apply_rope, softmax_scale

__all__ = [
    "IGNORE_INDEX", "MLA", "MLP", "Block", "ConfigError", "DecodeOutput", "DecodeSteps", "Decoder", "Draft", "Gate", "KVCache", "LMConfig", "LMOutput", "LayerCache",
    "MTPLayer", "MTPModule", "MoE", "RMSNorm", "Reference", "RotaryEmbedding", "RoutedExperts", "Transformer", "apply_rope", "ce_sum",
    "load_hf", "load_stats", "max_over_mean", "moe_layers", "mtp_loss", "route", "router_loads", "save_hf", "softmax_scale",
    "target_counts", "update_router_bias",
]
