"""Expert parallelism: EP x DDP takes the steps of the plain DDP run of the same world size (losses,
router biases, every weight) with uneven routing, an idle expert and an idle rank; its checkpoints
are in the global layout, so a run resumes at another EP degree, and its export captions as the DDP
run's; EP x FSDP2, EP inside a pipeline (1F1B, DualPipeV), EP with LoRA and EP with FP8 follow
their non-EP runs (slow); the dispatch sends a token once per rank, within the node limit; EP groups
stay within a pipeline stage; bad settings are named errors."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm.config import ConfigError
from train.config import TrainConfig
from train.parallel.dist import DistInfo
from train.parallel.expert_parallel import check_world

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for conftest helpers
from conftest import micro_config, micro_train_config, run_ranks  # noqa: E402

STEPS = 4
# The micro model's one MoE layer has 4 experts, top-2. A router bias of -10 keeps an expert unchosen
# (sigmoid scores are in [0, 1]; the bias moves 0.01 a step): under EP=2, expert 3 idle leaves rank 1
# one idle expert, experts 2 and 3 idle leave rank 1 no tokens at all.
RUN = """
cfg = cfg.replace(optim=cfg.optim.replace(max_steps={steps}, batch_size=8), log_every=1, save_every=2,
                  expert_parallel={ep})
real_build = T.build_model
def build_model(cfg, tok):
    model = real_build(cfg, tok)
    with torch.no_grad():
        model.lm.layers[1].ffn.gate.bias[{idle}] = -10.0
    return model
T.build_model = build_model
{more}
"""


def train_ranks(shards, out: Path, ep: int, nproc: int, idle: str, more: str = "", freeze: bool = False) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    return run_ranks(shards, out, RUN.format(steps=STEPS, ep=ep, idle=idle, more=more), nproc=nproc, freeze=freeze)


def checkpoint(out: Path, step: int) -> dict:
    return load_file(str(out / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss_main"] for line in lines]


def assert_same_run(a: Path, b: Path, step: int = STEPS, tol: float = 1e-5) -> None:
    wa, wb = checkpoint(a, step), checkpoint(b, step)
    assert sorted(wa) == sorted(wb)  # the global layout: every expert in both
    worst = {k: float((wa[k] - wb[k]).abs().max()) for k in wa}
    assert max(worst.values()) < tol, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    assert [k for k in wa if k.endswith("gate.bias") and not torch.equal(wa[k], wb[k])] == []


def assert_ranks_agree_on_biases(states: list[dict]) -> None:
    biases = [k for k in states[0] if k.endswith("gate.bias")]
    assert biases and all(torch.equal(s[k], states[0][k]) for s in states for k in biases)


@pytest.fixture(scope="module")
def two_rank_runs(synth_shards, tmp_path_factory):
    """Plain DDP and EP=2, both over 2 ranks, expert 3 idle."""
    root = tmp_path_factory.mktemp("ep2")
    runs = [train_ranks(synth_shards["train"], root / name, ep, 2, "3",
                        more=f"train_options['export'] = {str(root / name / 'export')!r}")
            for name, ep in (("ddp", 1), ("ep", 2))]
    return root, *runs


def test_ep2_over_two_ranks_equals_ddp(two_rank_runs):
    root, ddp, ep = two_rank_runs
    assert_same_run(root / "ddp", root / "ep")
    assert losses(root / "ep") == pytest.approx(losses(root / "ddp"), abs=1e-5)
    assert len(losses(root / "ep")) == STEPS
    assert_ranks_agree_on_biases(ep)
    w1 = "lm.layers.1.ffn.experts.w1"  # each rank holds its half of the experts, and only that
    assert [s[w1].shape[0] for s in ep] == [2, 2] and ddp[0][w1].shape[0] == 4
    full = checkpoint(root / "ep", STEPS)[w1]
    assert torch.equal(torch.cat([ep[0][w1], ep[1][w1]]), full)


def test_ep_export_captions_as_the_ddp_export(two_rank_runs, synth_shards):
    """The export of an EP run (read back from its gathered checkpoint) is the DDP run's Captioner."""
    from mm import Captioner
    from train.data.shards import synthetic_sample

    root, _, _ = two_rank_runs
    images = [synthetic_sample("test", 0, i)["png"] for i in range(4)]
    texts = [Captioner.from_pretrained(root / name / "export", device="cpu").caption(images, max_new_tokens=8)
             for name in ("ddp", "ep")]
    assert texts[0] == texts[1] and len(texts[0]) == 4


@pytest.mark.parametrize("source, ep", [("ep", 1), pytest.param("ddp", 2, marks=pytest.mark.slow)])
def test_resume_at_another_ep_degree(two_rank_runs, synth_shards, source, ep):
    """The EP=2 run's step-2 checkpoint continues under plain DDP (and the DDP run's under EP=2)
    and takes the steps both uninterrupted runs took."""
    root, _, _ = two_rank_runs
    out = root / f"resume-{source}"
    resume = str(root / source / "checkpoints" / f"step-{2:08d}")
    train_ranks(synth_shards["train"], out, ep, 2, "3", more=f"train_options['resume'] = {resume!r}")
    assert_same_run(root / "ddp", out)
    assert_same_run(root / source, out)


@pytest.mark.slow
def test_ep2_times_dp2_over_four_ranks_equals_ddp(synth_shards, tmp_path):
    """Ranks 1 and 3 (EP rank 1 of each replica) hold experts 2 and 3, which no token picks in layer 1:
    they get no rows there, yet take part in every all-to-all."""
    ddp = train_ranks(synth_shards["train"], tmp_path / "ddp", 1, 4, "2:")
    ep = train_ranks(synth_shards["train"], tmp_path / "ep", 2, 4, "2:")
    assert_same_run(tmp_path / "ddp", tmp_path / "ep")
    assert losses(tmp_path / "ep") == pytest.approx(losses(tmp_path / "ddp"), abs=1e-5)
    assert_ranks_agree_on_biases(ep)
    w2 = "lm.layers.1.ffn.experts.w2"  # replicas of the same experts agree
    assert torch.equal(ep[0][w2], ep[2][w2]) and torch.equal(ep[1][w2], ep[3][w2])
    del ddp


def test_expert_groups_are_carved_out_of_each_stage_replicas():
    """world = stages x dp, rank = pp_rank * dp + dp_rank: an EP group never spans two pipeline stages,
    and the ranks of a stage holding the same experts form its replica group."""
    from train.parallel.expert_dispatch import expert_group_ranks

    assert expert_group_ranks(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert expert_group_ranks(4, 2, stages=2) == ([[0, 1], [2, 3]], [[0], [1], [2], [3]])
    ep, replicas = expert_group_ranks(16, 2, stages=2)  # 2 stages x 8 replicas
    assert ep == [[i, i + 1] for i in range(0, 16, 2)]
    assert replicas == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]


PIPELINE = ("cfg = cfg.replace(model=helpers.micro_config(num_hidden_layers={layers}, first_k_dense_replace=0), "
            "pipeline=cfg.pipeline.replace(stages=2, schedule={schedule!r}, microbatches={microbatches}))")


@pytest.mark.slow
@pytest.mark.parametrize("schedule, layers, microbatches", [
    ("1f1b", 2, 2), ("dualpipev", 4, 4), ("gpipe", 2, 2), ("interleaved1f1b", 4, 4), ("zbv", 4, 4)])
def test_ep2_inside_a_pipeline_equals_the_pipeline(synth_shards, tmp_path, schedule, layers, microbatches):
    """2 stages x 2 replicas over 4 ranks, every layer MoE: EP=2 splits each stage's experts over its two
    replicas. Losses, router biases and every weight of the gathered checkpoints are the same pipeline's
    without EP, for every schedule (zbv's and dualpipev's split backward runs the all-to-alls of stage 0
    in its weight half, of the other stages in the input half, in step between EP peers). The gathered
    checkpoint resumes under EP and continues bit-identically to the run that never stopped."""
    more = PIPELINE.format(layers=layers, schedule=schedule, microbatches=microbatches)
    train_ranks(synth_shards["train"], tmp_path / "pp", 1, 4, "3", more=more)
    ep = train_ranks(synth_shards["train"], tmp_path / "ep", 2, 4, "3", more=more)
    w1 = "lm.layers.1.ffn.experts.w1"
    assert [s[w1].shape[0] for s in ep] == [2, 2, 2, 2]  # each rank holds half the experts
    assert_same_run(tmp_path / "pp", tmp_path / "ep", step=2)
    assert_same_run(tmp_path / "pp", tmp_path / "ep")
    assert losses(tmp_path / "ep") == pytest.approx(losses(tmp_path / "pp"), abs=1e-5)
    assert len(losses(tmp_path / "ep")) == STEPS
    resume = str(tmp_path / "ep" / "checkpoints" / f"step-{2:08d}")
    train_ranks(synth_shards["train"], tmp_path / "resumed", 2, 4, "3", more=f"{more}\ntrain_options['resume'] = {resume!r}")
    went_on, resumed = checkpoint(tmp_path / "ep", STEPS), checkpoint(tmp_path / "resumed", STEPS)
    assert went_on.keys() == resumed.keys() and all(torch.equal(went_on[k], resumed[k]) for k in went_on)


@pytest.mark.parametrize("n_group, topk_group, bound", [(1, 1, 4), (4, 2, 2), (8, 2, 2), (4, 1, 1)])
def test_send_plan_sends_a_token_once_per_rank_within_the_node_limit(n_group, topk_group, bound):
    """16 experts top-4 over 4 EP ranks: each (token, expert) pair reaches its expert's rank exactly
    once, a token travels once per rank it needs, and group-limited routing with n_group a multiple
    of the EP degree bounds those ranks by topk_group (DeepSeek-V3's node-limited routing)."""
    from lm.moe import route
    from train.parallel.expert_dispatch import send_plan

    cfg = micro_config(n_routed_experts=16, num_experts_per_tok=4, n_group=n_group, topk_group=topk_group).lm
    weights, idx, _ = route(torch.randn(64, 16), torch.randn(16), cfg)
    token, here, slots, sends = send_plan(idx, 4, 4)
    dest = torch.repeat_interleave(torch.arange(4), sends)
    assert int(sends.sum()) == token.numel() and bool((torch.diff(dest) >= 0).all())
    pairs = {(int(t), int(d) * 4 + int(s)) for t, d, row in zip(token, dest, slots) for s in row if s >= 0}
    assert pairs == {(t, int(e)) for t in range(64) for e in idx[t]}  # every pair once, on its owner
    assert len(set(zip(token.tolist(), dest.tolist()))) == token.numel()  # a token once per rank
    assert bool((here == (slots >= 0)).all())
    assert int(torch.bincount(token, minlength=64).max()) <= bound


def test_bad_settings_are_named_errors(synth_shards, tmp_path):
    base = micro_train_config(synth_shards, tmp_path)
    with pytest.raises(ConfigError, match="does not divide model.lm.n_routed_experts=4"):
        base.replace(expert_parallel=3)
    with pytest.raises(ConfigError, match="no MoE layers"):
        base.replace(model=micro_config(first_k_dense_replace=2), expert_parallel=2)
    with pytest.raises(ConfigError, match="expert_parallel=2 with compile=true"):
        base.replace(expert_parallel=2, compile=True)
    with pytest.raises(ConfigError, match="must be >= 1"):
        base.replace(expert_parallel=0)
    with pytest.raises(ConfigError, match="does not divide the world size 6"):
        check_world(base.replace(expert_parallel=4), DistInfo(world_size=6))
    with pytest.raises(ConfigError, match="does not divide the world size 1"):
        check_world(base.replace(expert_parallel=2), DistInfo(world_size=1))
    check_world(base.replace(expert_parallel=2), DistInfo(world_size=4))  # fine
    piped = base.replace(expert_parallel=2, pipeline=base.pipeline.replace(stages=2))
    check_world(piped, DistInfo(world_size=4))  # 2 stages x 2 replicas: EP over each stage's two
    with pytest.raises(ConfigError, match=r"does not divide the data-parallel ranks of each pipeline stage "
                                          r"\(world size 6 / pipeline.stages=2\); launch torchrun with a multiple of 4"):
        check_world(piped, DistInfo(world_size=6))
    cfg = TrainConfig.from_dict(base.to_dict() | {"expert_parallel": 2})  # the config key as JSON gives it
    assert cfg.expert_parallel == 2


FP8 = "cfg = cfg.replace(precision='fp8', model=cfg.model.replace(lm=cfg.model.lm.replace(hidden_size=128, moe_intermediate_size=128)))"


@pytest.mark.slow
def test_ep2_with_fp8_follows_ddp_with_fp8(synth_shards, tmp_path):
    """The local experts run FP8's grouped GEMM. The first forward is the same to the last bit (a row's
    activation tiles are its own); after that the runs drift apart by FP8's own noise, not more: the
    weight gradient's 1x128 tiles run along tokens, and a rank's tokens differ between EP and DDP, so
    each quantisation scale (and the roundings near a step of the E4M3 grid) can change."""
    train_ranks(synth_shards["train"], tmp_path / "ddp", 1, 2, "3", more=FP8)
    train_ranks(synth_shards["train"], tmp_path / "ep", 2, 2, "3", more=FP8)
    ddp, ep = losses(tmp_path / "ddp"), losses(tmp_path / "ep")
    assert ep[0] == ddp[0]
    assert ep == pytest.approx(ddp, rel=1e-3)
    assert_same_run(tmp_path / "ddp", tmp_path / "ep", tol=3e-2)


@pytest.mark.slow
def test_ep2_with_fsdp2_equals_fsdp2(synth_shards, tmp_path):
    """FSDP2 shards the non-expert parameters over both ranks and leaves the local experts to EP."""
    fsdp = "cfg = cfg.replace(parallel='fsdp')"
    train_ranks(synth_shards["train"], tmp_path / "fsdp", 1, 2, "3", more=fsdp)
    states = train_ranks(synth_shards["train"], tmp_path / "ep", 2, 2, "3", more=fsdp)
    assert_same_run(tmp_path / "fsdp", tmp_path / "ep")
    assert losses(tmp_path / "ep") == pytest.approx(losses(tmp_path / "fsdp"), abs=1e-5)
    assert_ranks_agree_on_biases(states)
    resume = str(tmp_path / "ep" / "checkpoints" / f"step-{2:08d}")  # and its checkpoint resumes under EP x FSDP2
    train_ranks(synth_shards["train"], tmp_path / "resumed", 2, 2, "3", more=f"{fsdp}\ntrain_options['resume'] = {resume!r}")
    assert_same_run(tmp_path / "fsdp", tmp_path / "resumed")


@pytest.mark.slow
def test_ep2_with_lora_equals_ddp_with_lora(synth_shards, tmp_path):
    """LoRA fine-tuning: each rank trains the adapters of its own experts; the checkpoint, the saved
    adapters (every expert's) and the merged export are the DDP run's."""
    more = ("cfg = cfg.replace(lora=cfg.lora.replace(enabled=True, rank=4))\n"
            "train_options.update(save_adapters=cfg.out_dir + '/adapters', export=cfg.out_dir + '/export')")
    for name, ep in (("ddp", 1), ("ep", 2)):
        train_ranks(synth_shards["train"], tmp_path / name, ep, 2, "3", more=more, freeze=True)
    assert_same_run(tmp_path / "ddp", tmp_path / "ep")
    # fp32 adapters to 1e-5; the bf16 export to a bf16 rounding step of the merged weights
    for file, has_expert_adapters, tol in (("adapters/adapters.safetensors", True, 1e-5),
                                           ("export/model.safetensors", False, 1e-2)):
        a, b = load_file(str(tmp_path / "ddp" / file)), load_file(str(tmp_path / "ep" / file))
        assert sorted(a) == sorted(b) and any(".experts.lora." in k for k in a) == has_expert_adapters
        assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < tol
