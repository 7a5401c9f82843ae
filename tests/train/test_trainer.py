"""The trainer: the loss falls (also under FP8), resume is exact, bad steps are skipped,
and two gloo processes end with identical weights and router biases."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train import trainer as T

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for conftest helpers
from conftest import micro_config, micro_train_config, run_two_ranks  # noqa: E402


def losses(run_dir):
    return [json.loads(x)["loss_main"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_checkpoint_is_complete(trained_micro):
    run = trained_micro.parents[1]
    seen = losses(run)
    assert len(seen) == 4 and seen[-1] < 0.75 * seen[0], seen
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_state/state.pt"):
        assert (trained_micro / name).is_file()
    assert (run / "loss.png").is_file()
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss_mtp", "grad_norm", "tokens_per_s", "images_per_s", "expert_load_max_over_mean",
                "skipped_steps", "data_errors", "lr"):
        assert key in rec


def test_fp8_emulated_training_loss_falls(synth_shards, tmp_path):
    # dims that are multiples of 128, so the FP8 pass really converts the LM's linears
    model = micro_config(hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                         kv_lora_rank=128, num_attention_heads=4, qk_nope_head_dim=32, v_head_dim=32)
    cfg = micro_train_config(synth_shards, tmp_path, model=model, precision="fp8")
    cfg = cfg.replace(optim=cfg.optim.replace(max_steps=30))
    T.train(cfg)
    seen = losses(tmp_path)
    assert seen[-1] < 0.8 * seen[0], seen


def test_resume_is_bit_exact(synth_shards, tmp_path):
    cfg = micro_train_config(synth_shards, tmp_path / "a", save_every=10, keep_last=5)
    cfg = cfg.replace(optim=cfg.optim.replace(max_steps=20))
    full = T.train(cfg)
    # a second run that only has the step-10 checkpoint (as if the first had died there)
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000010", b / "checkpoints" / "step-00000010")
    shutil.copy(tmp_path / "a" / "tokenizer.json", b / "tokenizer.json")
    resumed = T.train(cfg.replace(out_dir=str(b)), resume="auto")
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert different == []


def test_non_finite_losses_are_skipped_then_stop_the_run(synth_shards, tmp_path, monkeypatch):
    real = T.forward_loss
    calls = {"n": 0}

    def flaky(model, batch, cfg, device):
        out = real(model, batch, cfg, device)
        calls["n"] += 1
        if calls["n"] in (3, 4) or calls["n"] >= 8:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(T, "forward_loss", flaky)
    cfg = micro_train_config(synth_shards, tmp_path, max_bad_steps=3)
    with pytest.raises(T.TrainingStopped, match="3 consecutive"):
        T.train(cfg)
    saved = sorted((tmp_path / "checkpoints").iterdir())[-1]
    state = torch.load(saved / "train_state" / "state.pt", weights_only=True)
    assert state["skipped"] == 5 and state["step"] == 10
    weights = load_file(str(saved / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_two_process_ddp_ranks_agree(synth_shards, tmp_path):
    r0, r1 = run_two_ranks(synth_shards["train"], tmp_path,
                           "cfg = cfg.replace(optim=cfg.optim.replace(max_steps=6), log_every=3)")
    assert r0.keys() == r1.keys()
    # Parameters and router biases are identical. BatchNorm running statistics are not
    # compared: DDP copies rank 0's into every rank at the start of each forward, so after
    # the last step each rank holds its own update (rank 0's is the one saved).
    compared = [k for k in r0 if "running_" not in k and "num_batches_tracked" not in k]
    assert [k for k in compared if not torch.equal(r0[k], r1[k])] == []
    biases = [k for k in r0 if k.endswith("gate.bias")]
    assert biases and any(r0[k].abs().sum() > 0 for k in biases)  # the balancing really moved them
    assert len(losses(tmp_path)) == 2  # rank 0 alone logged (steps 3 and 6)
