"""Shared fixtures: tiny configs, synthetic shards and a briefly trained tiny captioner.

Tests run on the CPU unless marked `gpu`; the session fixtures are built once per run.
"""

import pytest
import torch

from lm.config import LMConfig
from mm.config import MMConfig, ProjectorConfig, VisionConfig


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def micro_config(vocab_size: int = 512, **lm_changes) -> MMConfig:
    """A captioner small enough to train for a few steps in a test: timm's test_resnet at 64 px
    (2x2 = 4 image tokens), a 2-layer MLA decoder (1 dense + 1 MoE layer) with MTP depth 1."""
    lm = LMConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=128, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                  v_head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                  moe_intermediate_size=32, max_position_embeddings=128, bias_update_speed=0.01)
    return MMConfig(vision=VisionConfig(model_name="test_resnet", image_size=64),
                    projector=ProjectorConfig(), lm=lm.replace(**lm_changes), max_text_len=48)


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory):
    """Synthetic scene shards: train (4 x 64 samples) and test (1 x 32)."""
    from train.data.shards import write_synthetic

    root = tmp_path_factory.mktemp("shards")
    write_synthetic(str(root), 256, seed=0, split="train", per_shard=64)
    write_synthetic(str(root), 32, seed=0, split="test", per_shard=32)
    return {"root": root, "train": str(root / "train-{000000..000003}.tar"),
            "test": str(root / "test-000000.tar")}


def micro_train_config(synth_shards, out_dir, **changes):
    from train.config import DataConfig, OptimConfig, TrainConfig

    cfg = TrainConfig(
        model=micro_config(), out_dir=str(out_dir), precision="fp32", channels_last=False,
        data=DataConfig(train=synth_shards["train"], num_workers=0, shuffle=50, epoch_batches=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=5, max_steps=40, batch_size=16),
        log_every=10, save_every=1000, tokenizer_vocab=320, tokenizer_samples=1000,
    )
    return cfg.replace(**changes)


@pytest.fixture(scope="session")
def trained_micro(synth_shards, tmp_path_factory):
    """A micro captioner trained for 40 steps: a real checkpoint directory for mm tests."""
    from train.trainer import train

    out = tmp_path_factory.mktemp("micro_run")
    path = train(micro_train_config(synth_shards, out))
    return path


@pytest.fixture(scope="session")
def tiny_app_checkpoint(tmp_path_factory):
    """A randomly initialised 2-layer captioner saved once, for the app's plumbing tests."""
    import app

    path = tmp_path_factory.mktemp("tiny_app") / "ckpt"
    app.untrained_captioner(num_hidden_layers=2).save_pretrained(path)
    return path


_TWO_RANK_SCRIPT = """
import importlib.util
import torch
from safetensors.torch import save_file
spec = importlib.util.spec_from_file_location("micro_conftest", {conftest!r})
helpers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(helpers)
from train import trainer as T
from train.parallel import dist as D
cfg = helpers.micro_train_config({{"train": {shards!r}}}, {out!r})
train_options = {{}}  # keyword arguments of trainer.train (resume, export), set by `changes`
{changes}
captured = {{}}
real_prepare = T.prepare
def prepare(model, cfg, info, log=print):
    if {freeze!r}:
        model.requires_grad_(False)  # as a fine-tuning stage freezes before the adapters go on
    captured["model"] = model
    return real_prepare(model, cfg, info, log)
T.prepare = prepare
T.train(cfg, **train_options)
rank = torch.distributed.get_rank()
full = lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v  # FSDP2's shards, whole (a collective)
state = {{k: full(v).detach().contiguous() for k, v in captured["model"].state_dict().items()}}
save_file(state, {out!r} + f"/rank{{rank}}.safetensors")
D.teardown()
"""


def run_two_ranks(shards: str, out, changes: str, freeze: bool = False):
    """Train the micro config under torchrun, 2 gloo processes; -> (rank 0's, rank 1's) final state
    dicts. `changes` is Python that derives `cfg` (e.g. "cfg = cfg.replace(log_every=3)") and may
    set `train_options`."""
    return tuple(run_ranks(shards, out, changes, freeze=freeze, nproc=2))


def run_ranks(shards: str, out, changes: str, freeze: bool = False, nproc: int = 2) -> list[dict]:
    """`run_two_ranks` over `nproc` gloo processes: each rank's final state dict (its own tensors:
    a rank's slice of the experts under expert parallelism)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    out = Path(out)
    script = out / "ranks.py"
    script.write_text(_TWO_RANK_SCRIPT.format(conftest=str(Path(__file__).resolve()), shards=shards,
                                              out=str(out), changes=changes, freeze=freeze))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
                           str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(nproc)]
