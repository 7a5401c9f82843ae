"""`mm finetune --stage lora`: only adapters move; the export is a plain Captioner equal to the
adapted model; saved adapters continue a run; resume is exact; two gloo processes agree; a new
task prompt is learnt from `add_tasks`."""

import json
import re
import shutil
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from mm.captioner import Captioner
from mm.checkpoint import load_checkpoint, load_state_strict
from mm.cli import main
from train import lora as L
from train.config import LoRAConfig
from train.finetune import set_stage

RANK4 = ["--lora.rank=4", "--lora.alpha=8"]


def short_run(synth_shards, out, steps=3):
    return ["--data", synth_shards["train"], "--out", str(out), f"--optim.max_steps={steps}",
            "--optim.batch_size=8", "--optim.warmup_steps=1", "--optim.lr=1e-2", "--precision=fp32",
            "--channels_last=false", "--data.num_workers=0", "--data.shuffle=10", "--log_every=1",
            f"--save_every={steps}"]


def last_checkpoint(out):
    return sorted((Path(out) / "checkpoints").iterdir())[-1]


def adapted_from(source, checkpoint, lora: LoRAConfig):
    """The adapted model a LoRA run's checkpoint holds: the source, adapters added, weights loaded."""
    model, tokenizer = load_checkpoint(source)
    set_stage(model, "lora", [], 0, lora)
    L.apply_lora(model, lora)
    load_state_strict(model, load_file(str(Path(checkpoint) / "model.safetensors")), str(checkpoint))
    return model.eval(), tokenizer


def test_lora_stage_trains_only_adapters_and_exports_a_plain_captioner(trained_micro, synth_shards, tmp_path,
                                                                       capsys):
    run, export, adapters = tmp_path / "run", tmp_path / "export", tmp_path / "adapters"
    rc = main(["finetune", "--from", str(trained_micro), "--stage", "lora", "--export", str(export),
               "--save-adapters", str(adapters), "--lora.experts=true"] + RANK4 + short_run(synth_shards, run))
    assert rc == 0
    captured = capsys.readouterr()
    err = captured.out + captured.err  # the trainer's lines go to stdout (tqdm.write), errors to stderr
    assert "lora: " in err and re.search(r"trainable [\d.]+M of [\d.]+M parameters \([\d.]+%\)", err)
    before, after = load_file(str(trained_micro / "model.safetensors")), load_file(str(last_checkpoint(run) / "model.safetensors"))
    added = set(after) - set(before)
    assert added and all(".lora." in k for k in added) and any(".experts.lora.w2." in k for k in added)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []  # base, router biases included
    assert any(k.endswith(".B") and after[k].abs().sum() > 0 for k in added)  # the adapters did train
    # the export loads with no adapter code and computes what the adapted model computes
    cap = Captioner.from_pretrained(export)
    assert set(load_file(str(export / "model.safetensors"))) == set(before)
    model, tokenizer = adapted_from(trained_micro, last_checkpoint(run), LoRAConfig(rank=4, alpha=8.0))
    images = torch.randn(2, 3, 64, 64)
    ids = torch.tensor([tokenizer.build_prompt(model.cfg.tasks["describe"], model.num_image_tokens)] * 2)
    with torch.no_grad():
        want = model.lm(inputs_embeds=model.embed(ids, model.encode_images(images)))
        got = cap.model.float().lm(inputs_embeds=cap.model.embed(ids, cap.model.encode_images(images)))
        base = load_checkpoint(trained_micro)[0]
        old = base.lm(inputs_embeds=base.embed(ids, base.encode_images(images)))
    assert (got - want).abs().max() < 0.05 * (want - old).abs().max()
    assert json.loads((adapters / "adapter_config.json").read_text())["lora"]["rank"] == 4
    assert set(load_file(str(adapters / "adapters.safetensors"))) == added


def test_saved_adapters_continue_a_run_with_their_own_layout(trained_micro, synth_shards, tmp_path, capsys):
    first, adapters = tmp_path / "first", tmp_path / "adapters"
    assert main(["finetune", "--from", str(trained_micro), "--stage", "lora", "--save-adapters", str(adapters)]
                + RANK4 + short_run(synth_shards, first)) == 0
    capsys.readouterr()
    # no --stage: --adapters implies lora; the config's rank 8 gives way to the saved rank 4
    second = tmp_path / "second"
    assert main(["finetune", "--from", str(trained_micro), "--adapters", str(adapters)]
                + short_run(synth_shards, second)[:-1] + ["--save_every=1", "--keep_last=5", "--optim.lr=1e-12"]) == 0
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert "lora.rank is 4 as in" in err and f"tensors from {adapters}" in err
    saved = load_file(str(adapters / "adapters.safetensors"))
    first_step = load_file(str(sorted((second / "checkpoints").iterdir())[0] / "model.safetensors"))
    assert all(torch.allclose(first_step[k], v, atol=1e-6) for k, v in saved.items())
    assert any(v.abs().sum() > 0 for k, v in saved.items() if k.endswith(".B"))
    rc = main(["finetune", "--from", str(trained_micro), "--stage", "full", "--adapters", str(adapters)]
              + short_run(synth_shards, tmp_path / "third"))
    assert rc == 2 and "--adapters needs --stage lora (the stage is full)" in capsys.readouterr().err


def test_lora_resume_is_bit_exact(trained_micro, synth_shards, tmp_path):
    args = ["finetune", "--from", str(trained_micro), "--stage", "lora", "--lora.dropout=0.1"] + RANK4
    assert main(args + short_run(synth_shards, tmp_path / "a", steps=4)[:-1] + ["--save_every=2"]) == 0
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000002", b / "checkpoints" / "step-00000002")
    assert main(args + short_run(synth_shards, b, steps=4)[:-1] + ["--save_every=2", "--resume", "auto"]) == 0
    wa = load_file(str(last_checkpoint(tmp_path / "a") / "model.safetensors"))
    wb = load_file(str(last_checkpoint(b) / "model.safetensors"))
    assert wa.keys() == wb.keys() and [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def test_a_new_task_prompt_from_add_tasks(trained_micro, synth_shards, tmp_path):
    config = tmp_path / "count.json"
    config.write_text(json.dumps({"add_tasks": {"count": "Count:"}, "data": {"tasks": ["count", "caption"]}}))
    rc = main(["finetune", "--from", str(trained_micro), "--stage", "lora", "--config", str(config),
               "--export", str(tmp_path / "export")] + RANK4 + short_run(synth_shards, tmp_path / "run"))
    assert rc == 0
    cap = Captioner.from_pretrained(tmp_path / "export")
    assert cap.model.cfg.tasks["count"] == "Count:" and "caption" in cap.tasks
    assert isinstance(cap.caption(Image.new("RGB", (64, 64)), task="count", max_new_tokens=3), str)


def test_two_process_ddp_lora_ranks_agree(synth_shards, tmp_path):
    sys.path.append(str(Path(__file__).resolve().parents[1]))
    from conftest import run_two_ranks

    r0, r1 = run_two_ranks(synth_shards["train"], tmp_path, freeze=True, changes=(
        "cfg = cfg.replace(optim=cfg.optim.replace(max_steps=4), log_every=2, "
        "lora=cfg.lora.replace(enabled=True, rank=4, dropout=0.1))"))
    adapters = [k for k in r0 if ".lora." in k]
    assert adapters and r0.keys() == r1.keys()
    assert [k for k in adapters if not torch.equal(r0[k], r1[k])] == []
    assert any(r0[k].abs().sum() > 0 for k in adapters if k.endswith(".B"))  # they trained, in step


def test_fp8_training_with_lora_trains_only_the_adapters(synth_shards, tmp_path, monkeypatch, capsys):
    """--precision fp8 with LoRA: the frozen base layers are converted, the adapters train."""
    from train import trainer as T

    sys.path.append(str(Path(__file__).resolve().parents[1]))
    from conftest import micro_config, micro_train_config

    model = micro_config(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, kv_lora_rank=128,
                         num_attention_heads=4, qk_nope_head_dim=32, v_head_dim=32)
    cfg = micro_train_config(synth_shards, tmp_path, model=model, precision="fp8", save_every=1, keep_last=5,
                             lora=LoRAConfig(enabled=True, rank=4))
    cfg = cfg.replace(optim=cfg.optim.replace(max_steps=3))
    real_prepare = T.prepare

    def prepare(model, cfg, info, log=print):
        set_stage(model, "lora", [], 0, cfg.lora)
        return real_prepare(model, cfg, info, log)

    monkeypatch.setattr(T, "prepare", prepare)
    T.train(cfg)
    out = capsys.readouterr().out
    converted = int(re.search(r"fp8: (\d+) layers converted", out)[1])
    assert converted >= 8 and "lora: " in out
    first, last = (load_file(str(p / "model.safetensors")) for p in sorted((tmp_path / "checkpoints").iterdir())[::2])
    assert [k for k in first if ".lora." not in k and not torch.equal(first[k], last[k])] == []
    assert [k for k in first if ".lora." in k and not torch.equal(first[k], last[k])]
