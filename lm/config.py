"""Language-model hyper-parameters, under the names of DeepSeek's published `config.json`.

Also home of `ConfigBase`, the strict JSON round trip every config in the project
uses: an unknown key or a value of the wrong type is an error that names the key,
so a typo in a training config never silently falls back to a default. Non-finite
numbers (JSON allows NaN and Infinity) are refused for every float field: no option
of this project means anything at NaN.

The project's two error types live here, as the one module every package imports:
`ConfigError` (a config that does not fit) and `CheckpointError` (a file that cannot
be read or does not match its config). Both are ValueErrors, so a caller that turns
bad input into a message catches one type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or dict that does not fit its dataclass."""


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read or does not match its config;
    the message names the file and the reason."""


def check_ranges(owner: str, checks: list[tuple[bool, str, Any]]) -> None:
    """Raise one ConfigError listing every (ok, "field: allowed range", value) that failed."""
    problems = [f"{what}, got {value!r}" for ok, what, value in checks if not ok]
    if problems:
        raise ConfigError(f"{owner}: " + "; ".join(problems))


def _check_value(owner: str, key: str, hint: Any, value: Any) -> Any:
    """Convert `value` to the field type `hint`, or raise naming `owner.key`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(owner, key, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{owner}.{key}: cannot be {value!r}")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{owner}.{key}: expected a dict for {hint.__name__}, got {value!r}")
        return hint.from_dict(value, _owner=f"{owner}.{key}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{owner}.{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_check_value(owner, key, item, v) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{owner}.{key}: expected a dict, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    return _check_scalar(owner, key, hint, value)


def _check_scalar(owner: str, key: str, hint: Any, value: Any) -> Any:
    """A bool, int, float (finite) or str field's value, strictly typed; other hints pass it through."""
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{owner}.{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{owner}.{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{owner}.{key}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an int beyond float range
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{owner}.{key}: expected a finite number, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{owner}.{key}: expected a string, got {value!r}")
        return value
    return value


class ConfigBase:
    """Mixin for dataclass configs: exact `to_dict`/`from_dict` and JSON files."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], _owner: str | None = None):
        owner = _owner or cls.__name__
        if not isinstance(data, dict):
            raise ConfigError(f"{owner}: expected a dict, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - fields))  # str: a dict built in Python may have any keys
        if unknown:
            raise ConfigError(
                f"{owner}: unknown key(s) {unknown}; valid keys are {sorted(fields)}"
            )
        kwargs = {k: _check_value(owner, k, hints[k], v) for k, v in data.items()}
        return cls(**kwargs)

    def replace(self, **changes):
        """A new config with `changes` applied (configs are never mutated in place)."""
        return dataclasses.replace(self, **changes)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path):
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        try:
            text = p.read_text(encoding="utf-8") if p is not None else str(path_or_text)
            data = json.loads(text)
        except FileNotFoundError as e:
            raise ConfigError(f"{p}: no such file") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p or 'config text'}: not valid JSON ({e})") from e
        return cls.from_dict(data)


@dataclasses.dataclass
class LMConfig(ConfigBase):
    vocab_size: int = 512
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 768  # SwiGLU width of the dense layers
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    # mla
    q_lora_rank: int | None = 0  # 0 or None: plain wq projection (DeepSeek-V2-Lite)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    attention_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}
    # moe
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    first_k_dense_replace: int = 1  # the first k layers use a dense MLP
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"  # noaux_tc (V3) | greedy | group_limited_greedy (V2)
    scoring_func: str = "sigmoid"  # sigmoid (V3) | softmax (V2)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    bias_update_speed: float = 0.001  # gamma of auxiliary-loss-free balancing; 0 turns it off
    aux_loss_alpha: float = 0.0  # weight of the sequence-wise balance loss; 0 turns it off
    seq_aux: bool = True
    # mtp
    num_nextn_predict_layers: int = 1
    mtp_lambda: float = 0.3  # MTP loss weight; the loss is main + lambda/D * sum(depth losses)
    mtp_depths: int = 0  # depths D in the MTP loss; 0 = one per module; more reuse the last module
    #                      on its own output, as chained speculative drafts do (Transformer.mtp_logits)

    def __post_init__(self):
        if self.q_lora_rank is None:
            self.q_lora_rank = 0
        self._check_ranges()  # first: the structural checks below divide by some of these
        checks = [
            (self.num_experts_per_tok <= max(self.n_routed_experts, 1),
             "num_experts_per_tok cannot exceed n_routed_experts"),
            (self.n_routed_experts == 0 or self.n_routed_experts % self.n_group == 0,
             "n_routed_experts must be divisible by n_group"),
            (self.topk_group <= self.n_group, "topk_group cannot exceed n_group"),
            (self.scoring_func in ("sigmoid", "softmax"), "scoring_func must be sigmoid or softmax"),
            (self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
             "topk_method must be noaux_tc, greedy or group_limited_greedy"),
            (self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even"),
            (self.mtp_depths == 0 or (self.num_nextn_predict_layers > 0
                                      and self.mtp_depths >= self.num_nextn_predict_layers),
             "mtp_depths must be 0 or at least num_nextn_predict_layers (>= 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"LMConfig: {msg}")
        if self.rope_scaling is not None:
            self._check_yarn(self.rope_scaling)

    @staticmethod
    def _check_yarn(rs: dict) -> None:
        """YaRN is the only rope scaling: its two required numbers present, every number finite."""
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        kind = rs.get("type", rs.get("rope_type"))
        problems = [] if kind == "yarn" else [f"type must be 'yarn', got {kind!r}"]
        problems += [f"{k} must be a number > 0, got {rs.get(k)!r}" for k in ("factor", "original_max_position_embeddings")
                     if not (number(rs.get(k)) and rs[k] > 0)]
        problems += [f"{k} must be a number or null, got {rs[k]!r}" for k in ("beta_fast", "beta_slow", "mscale",
                                                                              "mscale_all_dim")
                     if rs.get(k) is not None and not number(rs[k])]
        if problems:
            raise ConfigError("LMConfig.rope_scaling: " + "; ".join(problems))

    def _check_ranges(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "kv_lora_rank", "v_head_dim", "num_experts_per_tok",
                    "moe_intermediate_size", "moe_layer_freq", "n_group", "topk_group")
        non_negative = ("q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "n_routed_experts",
                        "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers", "mtp_depths",
                        "bias_update_speed", "aux_loss_alpha", "mtp_lambda", "initializer_range")
        check_ranges("LMConfig", [(getattr(self, k) >= 1, f"{k} must be >= 1", getattr(self, k)) for k in positive]
                     + [(getattr(self, k) >= 0, f"{k} must be >= 0", getattr(self, k)) for k in non_negative]
                     + [(self.rms_norm_eps > 0, "rms_norm_eps must be > 0", self.rms_norm_eps),
                        (self.rope_theta > 0, "rope_theta must be > 0", self.rope_theta),
                        (self.routed_scaling_factor > 0, "routed_scaling_factor must be > 0",
                         self.routed_scaling_factor)])

    @property
    def mtp_loss_depths(self) -> int:
        """MTP depths the training loss covers (see mtp_depths)."""
        return self.mtp_depths or self.num_nextn_predict_layers

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_id >= self.first_k_dense_replace
            and layer_id % self.moe_layer_freq == 0
        )
