"""Training configs: data, optimiser, precision, logging and checkpoints, plus the model.

A run is described by one JSON file (`configs/*.json`); command-line overrides use
dotted keys (`--optim.lr=3e-4 --model.lm.num_hidden_layers=2`) and are checked
against the dataclasses exactly like the file, so a typo is an error naming the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lm.config import ConfigBase, ConfigError, check_ranges
from mm.config import TASKS, MMConfig, preset
from train.data.augment import AugmentConfig  # the augment section, kept beside the changes it draws


@dataclass
class DataConfig(ConfigBase):
    train: str = ""  # shard URLs: a brace pattern, a path, http(s)://, pipe: (with allow_pipe); several joined with "::"
    val: str = ""
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    task_mode: str = "batch"  # batch: one task per batch | all: every task of every sample
    num_workers: int = 2
    resampled: bool = True  # sample shards with replacement (an endless stream)
    shuffle: int = 1000  # sample shuffle buffer
    epoch_batches: int = 0  # batches per (pseudo-)epoch of a resampled stream; 0 = from sizes.json
    pad_to: dict = field(default_factory=dict)  # task -> fixed padded length (avoids re-tuning kernels per length)
    allow_pipe: bool = False  # run `pipe:CMD` shard URLs in a shell (an explicit opt-in; off, they are refused)

    def __post_init__(self):
        bad_pad = {k: v for k, v in self.pad_to.items()
                   if not (isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1)}
        check_ranges("TrainConfig.data", [
            (bool(self.tasks) and len(set(self.tasks)) == len(self.tasks),
             "tasks must be a non-empty list without repeats", self.tasks),
            (self.task_mode in ("batch", "all"), "task_mode must be 'batch' or 'all'", self.task_mode),
            (self.num_workers >= 0, "num_workers must be >= 0", self.num_workers),
            (self.shuffle >= 0, "shuffle must be >= 0", self.shuffle),
            (self.epoch_batches >= 0, "epoch_batches must be >= 0 (0 = from sizes.json)", self.epoch_batches),
            (not bad_pad, "pad_to must map task names to lengths >= 1", bad_pad),
        ])


@dataclass
class OptimConfig(ConfigBase):
    lr: float = 1e-3
    lr_vision: float = 0.0  # 0 = same as lr
    lr_projector: float = 0.0  # 0 = same as lr
    weight_decay: float = 0.05  # not applied to norms, biases, embeddings and router biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 = off
    batch_size: int = 64  # per rank, per micro-step
    grad_accum: int = 1

    def __post_init__(self):
        check_ranges("TrainConfig.optim", [
            (self.lr > 0, "lr must be > 0", self.lr),
            (self.lr_vision >= 0, "lr_vision must be >= 0 (0 = same as lr)", self.lr_vision),
            (self.lr_projector >= 0, "lr_projector must be >= 0 (0 = same as lr)", self.lr_projector),
            (self.weight_decay >= 0, "weight_decay must be >= 0", self.weight_decay),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two numbers in [0, 1)",
             self.betas),
            (self.eps > 0, "eps must be > 0", self.eps),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0", self.warmup_steps),
            (self.max_steps >= 1, "max_steps must be >= 1", self.max_steps),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]", self.min_lr_ratio),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 = off)", self.grad_clip),
            (self.batch_size >= 1, "batch_size must be >= 1", self.batch_size),
            (self.grad_accum >= 1, "grad_accum must be >= 1", self.grad_accum),
        ])


LORA_TARGETS = ["wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w1", "w2", "w3"]  # MLA, dense/shared MLPs, experts


@dataclass
class LoRAConfig(ConfigBase):
    """Low-rank adapters (train/lora.py): a frozen W gains (alpha / rank) B A on the layer's input.
    Patterns are fnmatch globs on a module's name inside its part (`layers.0.attn.wq`) or on the
    name's last part (`wq`)."""

    enabled: bool = False  # set by mm finetune --stage lora
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input only
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # LM linear layers (and expert weights)
    experts: bool = True  # routed experts' stacked w1/w2/w3 that match targets
    mtp: bool = True  # adapters in the MTP modules' blocks too (when the loss uses them)
    vision: bool = False  # adapters on the encoder's blocks (Linear and Conv2d layers)
    vision_targets: list[str] = field(default_factory=lambda: ["*"])  # encoder layers inside its blocks
    train_projector: bool = False  # the projector trains fully beside the adapters
    train_mtp: bool = False  # the MTP modules train fully (and get no adapters)
    adapters: str = ""  # start from adapters saved with --save-adapters (mm finetune --adapters)

    def __post_init__(self):
        def patterns(v):
            return bool(v) and all(isinstance(p, str) and p for p in v)

        check_ranges("TrainConfig.lora", [
            (self.rank >= 1, "rank must be >= 1", self.rank),
            (self.alpha > 0, "alpha must be > 0", self.alpha),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)", self.dropout),
            (patterns(self.targets), "targets must be a non-empty list of name patterns", self.targets),
            (patterns(self.vision_targets), "vision_targets must be a non-empty list of name patterns",
             self.vision_targets),
        ])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b", "zbv", "dualpipev")


@dataclass
class VisionWarmupConfig(ConfigBase):
    """Supervised encoder warm-up on the synthetic scenes' attributes (train/vision_warmup.py)."""

    steps: int = 0  # 0 = off; for the synthetic-scene recipe only
    lr: float = 2e-3
    batch_size: int = 128
    weight_decay: float = 0.05

    def __post_init__(self):
        if self.steps < 0 or self.lr <= 0 or self.batch_size < 1 or self.weight_decay < 0:
            raise ConfigError(f"vision_warmup: steps >= 0, lr > 0, batch_size >= 1 and weight_decay >= 0 "
                              f"needed, got {self.to_dict()}")


@dataclass
class ParallelConfig(ConfigBase):
    """Pipeline parallelism (train/parallel/pipeline.py); under torchrun the data-parallel degree is
    world_size / stages. gpipe and 1f1b run one stage per rank; interleaved1f1b, zbv and
    dualpipev run two (zbv and dualpipev in a V: rank r holds stages r and 2 * stages - 1 - r)."""

    stages: int = 1  # ranks in the pipeline dimension; 1 = no pipeline
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved1f1b | zbv | dualpipev
    microbatches: int = 4  # per batch; optim.batch_size must be a multiple

    def __post_init__(self):
        if self.schedule not in PIPELINE_SCHEDULES:
            raise ConfigError(f"TrainConfig.pipeline.schedule: {self.schedule!r} is not one of {PIPELINE_SCHEDULES}")
        if self.stages < 1 or self.microbatches < 1:
            raise ConfigError(f"TrainConfig.pipeline: stages ({self.stages}) and microbatches "
                              f"({self.microbatches}) must be at least 1")


@dataclass
class TrainConfig(ConfigBase):
    model: MMConfig = field(default_factory=lambda: preset("tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    vision_warmup: VisionWarmupConfig = field(default_factory=VisionWarmupConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training images only
    precision: str = "bf16"  # fp32 | bf16 (autocast) | fp8 (fine-grained FP8 GEMMs + bf16 autocast)
    fp8_backend: str = "emulate"  # emulate (any device) | scaled_mm (GPUs with FP8)
    tokenizer: str = ""  # a tokenizer.json; empty = train a byte-level BPE on the training captions
    tokenizer_vocab: int = 512
    tokenizer_samples: int = 20000  # captions read to train the tokenizer
    out_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    eval_every: int = 0  # validation loss every N steps (needs data.val); 0 = off
    eval_batches: int = 10
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops
    channels_last: bool = True  # faster convolutions on CPU and GPU
    compile: bool = False
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard) when launched by torchrun
    pipeline: ParallelConfig = field(default_factory=ParallelConfig)  # stages > 1: pipeline x data parallel
    expert_parallel: int = 1  # N > 1: each MoE layer's routed experts split over N of the data-parallel ranks
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    add_tasks: dict = field(default_factory=dict)  # task -> prompt the model gains (teaching a new task)
    tensorboard: bool = False

    @property
    def autocast_dtype(self):  # what `precision` autocasts to: None for fp32; FP8's other operations run in bf16
        import torch
        return None if self.precision == "fp32" else torch.bfloat16

    def __post_init__(self):
        for name, value, allowed in [
            ("precision", self.precision, ("fp32", "bf16", "fp8")),
            ("fp8_backend", self.fp8_backend, ("emulate", "scaled_mm")),
            ("parallel", self.parallel, ("ddp", "fsdp")),
        ]:
            if value not in allowed:
                raise ConfigError(f"TrainConfig.{name}: {value!r} is not one of {allowed}")
        check_expert_parallel(self)
        known = sorted(self.model.tasks | self.add_tasks)
        bad_tasks = {k: v for k, v in self.add_tasks.items() if not (isinstance(v, str) and v.strip())}
        check_ranges("TrainConfig", [
            (not bad_tasks, "add_tasks must map new task names to non-empty prompts", bad_tasks),
            (not (self.lora.enabled and self.pipeline.stages > 1), "lora does not run with pipeline stages > 1",
             self.pipeline.stages),
            (set(self.data.tasks) <= set(known), f"data.tasks must be tasks the model has a prompt for ({known})",
             self.data.tasks),
            (set(self.data.pad_to) <= set(self.data.tasks), "data.pad_to must only name tasks in data.tasks",
             sorted(self.data.pad_to)),
            (self.tokenizer_vocab >= 260, "tokenizer_vocab must be >= 260 (256 bytes + 4 special tokens)",
             self.tokenizer_vocab),
            (self.tokenizer_samples >= 1, "tokenizer_samples must be >= 1", self.tokenizer_samples),
            (0 <= self.seed < 2**63, "seed must be in 0..2**63-1", self.seed),
            (self.log_every >= 1, "log_every must be >= 1", self.log_every),
            (self.save_every >= 1, "save_every must be >= 1", self.save_every),
            (self.keep_last >= 1, "keep_last must be >= 1", self.keep_last),
            (self.eval_every >= 0, "eval_every must be >= 0 (0 = off)", self.eval_every),
            (self.eval_batches >= 1, "eval_batches must be >= 1", self.eval_batches),
            (self.max_bad_steps >= 1, "max_bad_steps must be >= 1", self.max_bad_steps),
            (bool(self.out_dir), "out_dir must not be empty", self.out_dir),
        ])


def check_expert_parallel(cfg: TrainConfig) -> None:
    """What `expert_parallel` needs from the model and the other settings (the world size is checked
    at launch, train/parallel/expert_parallel.py); each refusal says why."""
    n, lm = cfg.expert_parallel, cfg.model.lm
    if n == 1:
        return
    if n < 1:
        raise ConfigError(f"TrainConfig.expert_parallel must be >= 1 (1 = off), got {n}")
    if not any(lm.is_moe_layer(i) for i in range(lm.num_hidden_layers)):
        raise ConfigError(f"expert_parallel={n}: the model has no MoE layers (n_routed_experts="
                          f"{lm.n_routed_experts}, first_k_dense_replace={lm.first_k_dense_replace} of "
                          f"{lm.num_hidden_layers} layers); there are no experts to split")
    if lm.n_routed_experts % n:
        raise ConfigError(f"expert_parallel={n} does not divide model.lm.n_routed_experts="
                          f"{lm.n_routed_experts}; choose a divisor of it")
    refused = [
        (cfg.compile, "compile=true: the dispatch's split sizes come from the routing of each batch (host "
         "values), which break the compiled graph; not supported yet"),
    ]
    for bad, why in refused:
        if bad:
            raise ConfigError(f"expert_parallel={n} with {why}")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--a.b.c=value` overrides (values parsed as JSON, else taken as strings)."""
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ConfigError(f"override {item!r} must look like --key.path=value")
        key, raw = item[2:].split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})  # a misspelled section fails in from_dict, by name
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section of the config")
        node[parts[-1]] = value
    return data


def load_train_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """A config file (or the defaults when path is None) with overrides applied and checked."""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist") from e
        except OSError as e:  # a directory, no permission, ...
            raise ConfigError(f"config file {path}: cannot be read ({e.strerror or e})") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
    else:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of config sections, got a {type(data).__name__}")
    if isinstance(data.get("model"), str):  # "model": "tiny" names a preset
        data["model"] = preset(data["model"]).to_dict()
    data.setdefault("model", preset("tiny").to_dict())
    return TrainConfig.from_dict(apply_overrides(data, list(overrides)))
