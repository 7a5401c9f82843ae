"""Import and export of Hugging Face DeepSeek-V2/V3 checkpoints (`config.json` + safetensors).

The config is a key map (our LMConfig uses the published names, so it is mostly the
identity); the weights are a name map from our reference-style names to the HF ones:
`layers.3.attn.wkv_a` <-> `model.layers.3.self_attn.kv_a_proj_with_mqa`, stacked routed
experts `ffn.experts.w1[e]` <-> `mlp.experts.{e}.gate_proj`, MTP module k <->
`model.layers.{num_hidden_layers + k - 1}`, whose own final norm `shared_head.norm` is
`mtp.{k-1}.norm` and is required; its `embed_tokens` / `shared_head.head` copies of the
main embedding and head are written on save and skipped on load. A checkpoint with no
MTP layer at all (as transformers saves DeepSeek-V3) loads without MTP, with a warning.
Unknown config keys warn; missing essentials are errors. Every problem with the
directory (a missing or unreadable file, bad JSON, a damaged shard, a tensor that is
missing, extra, misshaped or of an unsupported dtype, a layer count the tensors do not
have) is a `CheckpointError` naming the file, found before the model is built.

Numerics: tensors keep their stored dtype unless `dtype` is given (then all of them,
router included, take it). FP8 weights
(float8_e4m3fn with a `weight_scale_inv` per 128x128 block, ceil-divided at the
edges) are dequantised as w.float() * scale_inv. RoPE: our rope pairs are interleaved
like DeepSeek's code and `rope_interleave: true` (transformers' default); a
checkpoint with `rope_interleave: false` stores the rope rows of q and the rope key
half-split, so those rows are re-interleaved on load.

Memory: the model is built on the meta device and each tensor is allocated once,
then filled shard by shard, so a load never holds two copies of the weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lm.config import CheckpointError, ConfigError, LMConfig
from lm.model import Transformer
from lm.rope import RotaryEmbedding

ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
# Defaults of fields a published config may leave out; they differ between V2 and V3.
TYPE_DEFAULTS = {
    "deepseek_v2": dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
                        routed_scaling_factor=1.0, num_nextn_predict_layers=0),
    "deepseek_v3": dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                        routed_scaling_factor=2.5, num_nextn_predict_layers=0),
}
ESSENTIAL = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
ESSENTIAL_MOE = ("num_experts_per_tok", "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace")
RENAMES = {"num_mtp_layers": "num_nextn_predict_layers"}  # transformers' alias
# Keys with no effect on the weights or the logits (or handled elsewhere: rope, FP8 scales).
IGNORED = {"architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
           "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "quantization_config",
           "num_key_value_heads", "head_dim", "qk_head_dim", "pretraining_tp", "ep_size",
           "attention_dropout", "output_router_logits", "rope_theta", "rope_scaling", "rope_parameters",
           "rope_interleave", "hidden_act", "mlp_bias", "_name_or_path"}
TOP_KEYS = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "head.weight": "lm_head.weight"}
BLOCK_MODULES = {  # ours (inside a Block or MTPModule) -> HF (inside model.layers.N)
    "attn.wq": "self_attn.q_proj", "attn.wq_a": "self_attn.q_a_proj", "attn.q_norm": "self_attn.q_a_layernorm",
    "attn.wq_b": "self_attn.q_b_proj", "attn.wkv_a": "self_attn.kv_a_proj_with_mqa",
    "attn.kv_norm": "self_attn.kv_a_layernorm", "attn.wkv_b": "self_attn.kv_b_proj", "attn.wo": "self_attn.o_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "ffn.w1": "mlp.gate_proj", "ffn.w2": "mlp.down_proj", "ffn.w3": "mlp.up_proj", "ffn.gate": "mlp.gate",
    "ffn.shared_experts.w1": "mlp.shared_experts.gate_proj", "ffn.shared_experts.w2": "mlp.shared_experts.down_proj",
    "ffn.shared_experts.w3": "mlp.shared_experts.up_proj",
}
MTP_MODULES = {  # an MTPModule's own modules, outside its block
    "enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm"}
EXPERT_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
MTP_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}
FP8_BLOCK = 128
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def config_from_hf(hf: dict, source: str = "config.json") -> tuple[LMConfig, bool]:
    """An HF config dict -> (LMConfig, rope_interleave)."""
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; expected one of {sorted(ARCHITECTURES)}")
    essential = ESSENTIAL + (ESSENTIAL_MOE if hf.get("n_routed_experts") else ())
    missing = [k for k in essential if k not in hf or (hf[k] is None and k != "q_lora_rank")]
    if missing:
        raise ConfigError(f"{source}: missing essential key(s) {missing}")
    quant = hf.get("quantization_config") or {}
    block = quant.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK]) if isinstance(quant, dict) else quant
    if not isinstance(block, (list, tuple)) or list(block) != [FP8_BLOCK, FP8_BLOCK]:
        raise ConfigError(f"{source}: FP8 weight_block_size {block} is not supported, only [128, 128]")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
        raise ConfigError(f"{source}: only SwiGLU MLPs without bias are supported "
                          f"(hidden_act {hf.get('hidden_act')!r}, mlp_bias {hf.get('mlp_bias')!r})")
    fields = {f.name for f in dataclasses.fields(LMConfig)}
    values, unknown = dict(TYPE_DEFAULTS[model_type]), []
    if not hf.get("n_routed_experts"):  # a dense model
        values.update(n_routed_experts=0, num_experts_per_tok=1, n_group=1, topk_group=1)
    for key, value in hf.items():
        key = RENAMES.get(key, key)
        if key in fields and key != "rope_scaling" and (value is not None or key == "q_lora_rank"):
            values[key] = value
        elif key not in fields and key not in IGNORED:
            unknown.append(key)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown config key(s) {unknown}", stacklevel=3)
    values["rope_theta"], values["rope_scaling"] = _rope_from_hf(hf, source)
    return LMConfig.from_dict(values), bool(hf.get("rope_interleave", True))


def _rope_from_hf(hf: dict, source: str) -> tuple[object, dict | None]:
    # transformers >= 5 writes `rope_parameters` (theta inside); DeepSeek's configs `rope_theta` + `rope_scaling`
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_scaling / rope_parameters must be an object, got {params!r}")
    params = dict(params)
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))  # LMConfig checks it is a number
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"{source}: rope type {kind!r} is not supported (only yarn or none)")
    return theta, {"type": "yarn", **params}


def config_to_hf(cfg: LMConfig, model_type: str, dtype: torch.dtype) -> dict:
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"save_hf: model_type {model_type!r} is not one of {sorted(ARCHITECTURES)}")
    if model_type == "deepseek_v2" and cfg.topk_method == "noaux_tc" and cfg.n_routed_experts:
        raise ConfigError("save_hf: deepseek_v2 has no e_score_correction_bias; save topk_method "
                          "'noaux_tc' as model_type='deepseek_v3'")
    out = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, **cfg.to_dict()}
    out.update(q_lora_rank=cfg.q_lora_rank or None, num_key_value_heads=cfg.num_attention_heads,
               hidden_act="silu", torch_dtype=str(dtype).removeprefix("torch."))
    return out


def hf_names(key: str, cfg: LMConfig) -> list[str]:
    """The HF tensor name(s) of one of our state_dict keys; stacked experts give one per expert."""
    if key in TOP_KEYS:
        return [TOP_KEYS[key]]
    m = re.fullmatch(r"layers\.(\d+)\.()(.+)", key) or re.fullmatch(r"mtp\.(\d+)\.(block\.)?(.+)", key)
    if m is None:
        raise KeyError(f"hf_names: no DeepSeek checkpoint name for parameter {key!r}")
    in_mtp = key.startswith("mtp.")
    index = int(m[1]) + (cfg.num_hidden_layers if in_mtp else 0)
    prefix, rest = f"model.layers.{index}.", m[3]
    if is_stacked(key):
        proj = EXPERT_PROJ[rest[-2:]]
        return [f"{prefix}mlp.experts.{e}.{proj}.weight" for e in range(cfg.n_routed_experts)]
    if rest == "ffn.gate.bias":
        return [prefix + "mlp.gate.e_score_correction_bias"]
    module, _, param = rest.rpartition(".")
    modules = MTP_MODULES if in_mtp and not m[2] else BLOCK_MODULES
    if module not in modules:
        raise KeyError(f"hf_names: no DeepSeek checkpoint name for parameter {key!r}")
    return [f"{prefix}{modules[module]}.{param}"]


def is_stacked(key: str) -> bool:
    """Routed experts are one [E, ...] tensor here and E tensors in the checkpoint."""
    return re.search(r"ffn\.experts\.w[123]$", key) is not None


def _rope_rows(key: str, cfg: LMConfig, rows: int) -> torch.Tensor | None:
    """Row order turning a half-split rope layout (rope_interleave false) into interleaved pairs."""
    if not re.search(r"attn\.(wq|wq_b|wkv_a)\.", key):
        return None
    r = cfg.qk_rope_head_dim
    pairs = torch.stack([torch.arange(r // 2), torch.arange(r // 2) + r // 2], -1).flatten()
    if ".wkv_a." in key:
        return torch.cat([torch.arange(cfg.kv_lora_rank), cfg.kv_lora_rank + pairs])
    per_head = torch.cat([torch.arange(cfg.qk_nope_head_dim), cfg.qk_nope_head_dim + pairs])
    return (per_head + cfg.qk_head_dim * torch.arange(rows // cfg.qk_head_dim)[:, None]).flatten()


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """float8 w [R, C] times its per-block scale_inv [ceil(R/block), ceil(C/block)] -> fp32."""
    r, c = w.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:r].repeat_interleave(block, 1)[:, :c]
    return w.float() * scale


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"load_hf: {file} does not exist") from e
    except (ValueError, OSError) as e:  # bad JSON, not UTF-8, unreadable
        raise CheckpointError(f"load_hf: {file}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"load_hf: {file}: expected a JSON object, got a {type(data).__name__}")
    return data


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"load_hf: {index} has no 'weight_map' object (tensor name -> file name)")
        return {k: path / f for k, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"load_hf: {path} has neither model.safetensors nor model.safetensors.index.json")
    return dict.fromkeys(_open_shard(single, lambda f: f.keys()), single)


def _open_shard(file: Path, read):
    """read(safe_open handle); a missing, empty or damaged file is a CheckpointError naming it."""
    try:
        with safe_open(file, "pt") as f:
            return read(f)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"load_hf: {file}: not a readable safetensors file ({e})") from e


def _shapes_and_dtypes(f) -> dict[str, tuple[tuple[int, ...], str]]:
    slices = {k: f.get_slice(k) for k in f.keys()}
    return {k: (tuple(t.get_shape()), t.get_dtype()) for k, t in slices.items()}


def _read_headers(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    headers = {}
    for file in sorted(set(files.values())):
        headers.update(_open_shard(file, _shapes_and_dtypes))
    if set(files) - set(headers):
        raise CheckpointError(f"load_hf: index lists tensors missing from the shards: {sorted(set(files) - set(headers))[:5]}")
    return headers


def _check_layers(cfg: LMConfig, headers: dict, source: Path) -> None:
    """The layer count against the tensors, before a model of that size is built."""
    present = {int(m[1]) for n in headers if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    main = set(range(cfg.num_hidden_layers))
    if main - present:
        have = f"layers 0..{max(present)}" if present else "no layers"
        raise CheckpointError(f"load_hf: {source / 'config.json'} says num_hidden_layers={cfg.num_hidden_layers}, "
                              f"but the weights have {have} ({len(present)} layer indices, MTP included); "
                              f"missing e.g. {sorted(main - present)[:5]}")
    extra = sorted(present - main - set(range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers)))
    if extra:
        raise CheckpointError(f"load_hf: {source} has tensors for layers {extra[:5]} beyond num_hidden_layers="
                              f"{cfg.num_hidden_layers} + num_nextn_predict_layers={cfg.num_nextn_predict_layers}")


def _check(plan: dict, headers: dict, cfg: LMConfig, source: Path) -> None:
    """Fail before loading anything: missing, misshaped or unexpected tensors, named."""
    missing = [n for n in plan if n not in headers]
    if missing:
        norms = [n for n in missing if n.endswith("shared_head.norm.weight")]
        hint = (f"; {norms} is the MTP layer's own final norm, not a copy of model.norm.weight: "
                "a checkpoint whose MTP shared the main norm needs that copy added") if norms else ""
        raise CheckpointError(f"load_hf: {source} lacks {len(missing)} tensor(s), e.g. {missing[:5]}{hint}")
    for name, (_, _, shape) in plan.items():
        found, dt = headers[name]
        if found != shape:
            raise CheckpointError(f"load_hf: {source}: tensor {name!r} has shape {list(found)}, expected {list(shape)}")
        if dt not in SAFETENSORS_DTYPES and not dt.startswith("F8"):
            raise CheckpointError(f"load_hf: {source}: tensor {name!r} has dtype {dt}; weights must be one of "
                                  f"{sorted(SAFETENSORS_DTYPES)} or FP8 (F8_E4M3 with a weight_scale_inv)")
        if dt.startswith("F8"):
            want = tuple(math.ceil(d / FP8_BLOCK) for d in shape)
            got = headers.get(name + "_scale_inv", (None,))[0]
            if got != want:
                raise CheckpointError(f"load_hf: {source}: FP8 tensor {name!r} needs {name}_scale_inv of shape "
                                      f"{list(want)}, found {list(got) if got else 'none'}")
    skipped = {f"model.layers.{cfg.num_hidden_layers + k}.{n}" for k in range(cfg.num_nextn_predict_layers)
               for n in MTP_COPIES}
    extra = [n for n in headers if n not in plan and n not in skipped and not n.endswith(("_scale_inv", "inv_freq"))]
    if extra:
        raise CheckpointError(f"load_hf: {source} has {len(extra)} tensor(s) the model has no place for, e.g. {extra[:5]}")


def load_hf(path: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu") -> Transformer:
    """A DeepSeek-V2/V3 HF directory -> lm.Transformer in eval mode (dtype None keeps stored dtypes)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"load_hf: {path} is not a directory")
    hf = _read_json(path / "config.json")
    try:
        cfg, interleaved = config_from_hf(hf, str(path / "config.json"))
    except ConfigError as e:
        where = "" if str(path / "config.json") in str(e) else f"{path / 'config.json'}: "
        raise CheckpointError(f"load_hf: {where}{e}") from e
    files = _weight_files(path)
    headers = _read_headers(files)
    _check_layers(cfg, headers, path)
    if cfg.num_nextn_predict_layers and not any(n.startswith(f"model.layers.{cfg.num_hidden_layers}.") for n in headers):
        warnings.warn(f"load_hf: {path} has no MTP weights; loading without MTP modules", stacklevel=2)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(cfg)
    meta = {k: t for k, t in model.state_dict().items() if not (k == "head.weight" and cfg.tie_word_embeddings)}
    plan = {}  # HF name -> (our key, expert index or None, expected shape)
    for key, t in meta.items():
        for e, name in enumerate(hf_names(key, cfg)):
            plan[name] = (key, e, tuple(t.shape[1:])) if is_stacked(key) else (key, None, tuple(t.shape))
    _check(plan, headers, cfg, path)
    fp8_dtype = getattr(torch, str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"), torch.bfloat16)
    targets = {}  # our key -> its tensor, allocated once in the dtype it keeps
    for name, (key, _, _) in plan.items():
        stored = headers[name][1]
        want = dtype or (fp8_dtype if stored.startswith("F8") else SAFETENSORS_DTYPES[stored])
        targets.setdefault(key, torch.empty(meta[key].shape, dtype=want, device=device))
    _fill(targets, plan, files, headers, cfg, interleaved)
    _install(model, targets, cfg, device)
    return model.eval()


def _fill(targets: dict, plan: dict, files: dict, headers: dict, cfg: LMConfig, interleaved: bool) -> None:
    """Copy every planned tensor into place, shard by shard, one tensor in flight at a time."""
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, "pt")) for f in sorted(set(files.values()))}
        for f in handles.values():
            for name in f.keys():
                if name not in plan:
                    continue
                key, expert, _ = plan[name]
                t = f.get_tensor(name)
                if headers[name][1].startswith("F8"):
                    t = dequantize_fp8(t, handles[files[name + "_scale_inv"]].get_tensor(name + "_scale_inv"))
                if not interleaved and (rows := _rope_rows(key, cfg, t.shape[0])) is not None:
                    t = t[rows]
                (targets[key] if expert is None else targets[key][expert]).copy_(t)


def _install(model: Transformer, tensors: dict[str, torch.Tensor], cfg: LMConfig, device) -> None:
    """Put the loaded tensors in place of the meta ones and rebuild the derived (non-persistent) state."""
    params = dict(model.named_parameters())
    for key, t in tensors.items():
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        if key in params:
            module._parameters[name] = nn.Parameter(t, requires_grad=params[key].requires_grad)
        else:
            module._buffers[name] = t
    if cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight
    model.rope = RotaryEmbedding(cfg).to(device)  # inv_freq is computed from the config, never stored
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buf = module._buffers[name]
            if buf is not None and buf.is_meta:  # MoE load counters start from zero
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)


def _hf_tensors(model: Transformer) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) in checkpoint order; MTP layers also carry copies of the embedding and head."""
    cfg, state = model.cfg, model.state_dict()
    out = []
    for key, t in state.items():
        if key == "head.weight" and cfg.tie_word_embeddings:
            continue
        names = hf_names(key, cfg)
        out += zip(names, t.unbind(0)) if is_stacked(key) else [(names[0], t)]
    for k in range(cfg.num_nextn_predict_layers):
        out += [(f"model.layers.{cfg.num_hidden_layers + k}.{n}", state[ours]) for n, ours in MTP_COPIES.items()]
    return out


def save_hf(model: Transformer, path: str | os.PathLike, shard_size: int = 5_000_000_000,
            model_type: str = "deepseek_v3") -> Path:
    """Write config.json and safetensors (sharded with an index above shard_size bytes); returns path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_cfg = config_to_hf(model.cfg, model_type, model.embed.weight.dtype)
    shards, size = [[]], 0
    for name, t in _hf_tensors(model):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    n = len(shards)
    file_names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file_name, shard in zip(file_names, shards):
        # clone: per-expert views share storage, which safetensors refuses to write
        atomic_file(path / file_name, lambda p, s=shard: save_file(
            {k: t.detach().to("cpu", copy=True).contiguous() for k, t in s}, p, metadata={"format": "pt"}))
    index = path / "model.safetensors.index.json"
    if n > 1:
        total = sum(t.numel() * t.element_size() for s in shards for _, t in s)
        weight_map = {k: f for f, s in zip(file_names, shards) for k, _ in s}
        atomic_file(index, lambda p: Path(p).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)))
    for stale in [*path.glob("model-*-of-*.safetensors"), path / "model.safetensors", index]:
        if stale.exists() and stale.name not in file_names and not (stale == index and n > 1):
            stale.unlink()  # left by an earlier save with a different sharding
    atomic_file(path / "config.json", lambda p: Path(p).write_text(json.dumps(hf_cfg, indent=2) + "\n"))
    return path


def atomic_file(target: str | Path, write, suffix: str = ".tmp") -> None:
    """Call `write(tmp_path)` beside the target, then rename, so a crash never leaves a half-written
    file; a write that fails removes its temporary file and leaves the target as it was. The one
    file writer of the project (checkpoint directories: mm.checkpoint.atomic_dir)."""
    target = Path(target)
    tmp = target.with_name(target.name + suffix)
    try:
        write(str(tmp))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
