"""Pipeline parallelism: the stages reproduce the model's loss and gradients, a 2-rank
pipeline (every schedule: GPipe, 1F1B, interleaved 1F1B, ZB-V, DualPipeV) and a 2x2
pipeline x data run take the same steps as the single-process trainer, checkpoints move
both ways between pipelined and plain runs, and `trainer.train` runs a pipeline in its one loop."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm.loss import IGNORE_INDEX
from mm.checkpoint import load_checkpoint
from mm.config import VisionConfig
from mm.model import CaptionModel
from mm.tokenizer import Tokenizer
from train import trainer as T
from train.checkpoints import load_train_state, save
from train.config import OptimConfig, ParallelConfig, TrainConfig
from train.parallel import dist as D
from train.parallel.data_parallel import DataParallel
from train.parallel.stages import SCHEDULES, MicrobatchLoss, RankParts, Stage, rank_stages, split_layers
from train.runlog import RunLog
from train.state import RunState

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for conftest helpers
from conftest import micro_config  # noqa: E402

CONFTEST = str(Path(__file__).resolve().parents[1] / "conftest.py")
TEXTS = ["a large red circle", "a small blue square and a large green triangle", "a purple diamond",
         "There are two shapes on a gray background.", "an orange circle at the top left"] * 4


def tiny_cfg(tmp_path, **pipeline) -> TrainConfig:
    # 4 layers so that 2 ranks x 2 stages split evenly; a LayerNorm encoder (test_convnext)
    # because BatchNorm statistics would differ between a microbatch and the whole batch
    model = micro_config(num_hidden_layers=4, aux_loss_alpha=1e-3)
    model = model.replace(vision=VisionConfig(model_name="test_convnext", image_size=64))
    return TrainConfig(model=model, out_dir=str(tmp_path), precision="fp32", channels_last=False, seed=0,
                       optim=OptimConfig(lr=3e-3, warmup_steps=2, max_steps=10, batch_size=8, grad_clip=0.5),
                       pipeline=ParallelConfig(**pipeline))


def make_batches(tok: Tokenizer, n: int, batch_size: int, n_image: int, seed: int = 0) -> list[dict]:
    """Fixed batches of right-padded sequences of different lengths (so padding matters)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rows = [tok.build_example("Describe.", TEXTS[int(torch.randint(len(TEXTS), (1,), generator=g))], n_image)
                for _ in range(batch_size)]
        t = max(len(ids) for ids, _ in rows)
        ids = torch.full((batch_size, t), tok.pad_id)
        labels = torch.full((batch_size, t), IGNORE_INDEX)
        for i, (x, y) in enumerate(rows):
            ids[i, :len(x)], labels[i, :len(y)] = torch.tensor(x), torch.tensor(y)
        out.append({"images": torch.randn(batch_size, 3, 64, 64, generator=g), "input_ids": ids,
                    "attention_mask": (torch.arange(t) < torch.tensor([len(x) for x, _ in rows])[:, None]).long(),
                    "labels": labels})
    return out


class FixedStream:
    def __init__(self, batches, start=0):
        self.batches, self.i = batches, start

    def next(self):
        self.i += 1
        return self.batches[self.i - 1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(TEXTS, vocab_size=320).save(path)
    return Tokenizer.from_file(path)


def test_uneven_layer_split_names_the_numbers():
    assert [list(r) for r in split_layers(4, 2, "dualpipev")] == [[0], [1], [2], [3]]
    assert [list(r) for r in split_layers(6, 2, "1f1b")] == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match=r"6 LM layers do not split evenly over 4 pipeline stages \(2 ranks x 2"):
        split_layers(6, 2, "dualpipev")
    with pytest.raises(ValueError, match="5 LM layers .* 2 pipeline stages"):
        split_layers(5, 2, "gpipe")
    with pytest.raises(ValueError, match="2 LM layers .* 4 pipeline stages"):
        split_layers(2, 2, "zbv")
    assert rank_stages("dualpipev", 0, 2) == [0, 3] and rank_stages("interleaved1f1b", 1, 2) == [1, 3]


def test_unsupported_pipeline_settings_are_config_errors(tmp_path):
    from lm.config import ConfigError
    from train.parallel.pipeline import check_supported

    cfg = tiny_cfg(tmp_path, stages=2, microbatches=4)
    check_supported(cfg)
    for change, message in [({"parallel": "fsdp"}, "parallel='fsdp'"), ({"compile": True}, "compile=true"),
                            ({"optim": cfg.optim.replace(batch_size=6)}, "batch_size=6 does not split into pipeline.microbatches=4")]:
        with pytest.raises(ConfigError, match=message):
            check_supported(cfg.replace(**change))
    validated = cfg.replace(eval_every=4, data=cfg.data.replace(val="val.tar"))
    check_supported(validated)  # gpipe evaluates
    for schedule in ("zbv", "dualpipev"):  # these fail in torch's forward-only run: refused before any step
        with pytest.raises(ConfigError, match=f"validation .* does not run under pipeline.schedule='{schedule}'"):
            check_supported(validated.replace(pipeline=validated.pipeline.replace(schedule=schedule)))
        check_supported(cfg.replace(pipeline=cfg.pipeline.replace(schedule=schedule)))  # without validation they run


@pytest.mark.parametrize("mtp_depths", [0, 2])  # 2: the MTP module chained on its own output
def test_stages_reproduce_the_model_loss_and_gradients(tmp_path, tok, mtp_depths):
    cfg = tiny_cfg(tmp_path)
    cfg = cfg.replace(model=cfg.model.replace(lm=cfg.model.lm.replace(mtp_depths=mtp_depths)))
    model = CaptionModel(cfg.model, image_token_id=tok.image_id)
    batch = make_batches(tok, 1, 4, model.num_image_tokens)[0]
    ref = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"])
    ref.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    ranges = split_layers(4, 2, "dualpipev")
    stages = [Stage(model, r, i == 0, i == 3) for i, r in enumerate(ranges)]
    loss_fn = MicrobatchLoss(model.cfg.lm)
    loss_fn.start(batch["labels"])
    for mb in range(2):  # two microbatches of two sequences, carried through the four stages
        part = {k: v[2 * mb:2 * mb + 2] for k, v in batch.items()}
        x = (part["images"], part["input_ids"])
        for stage in stages:
            x = stage(*x, attention_mask=part["attention_mask"])
        loss_fn(x, part["labels"]).backward()
    _, main, mtp, aux = loss_fn.totals(2)
    for got, expected in [(main, ref.main), (mtp, ref.mtp), (aux, ref.aux)]:
        assert abs(float(got) - float(expected.detach())) < 1e-5, (got, expected)
    assert float(aux) > 0 and float(mtp) > 0  # both extra terms are really exercised
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    worst = max(float((got[n] - want[n]).abs().max() / want[n].abs().max().clamp(min=1e-8)) for n in want)
    assert worst < 1e-4, worst

    # the two V ranks' parts partition the model's state dict, under its own names
    keys = [set(RankParts(model, [stages[i] for i in rank_stages("dualpipev", r, 2)],
                          [j for i in rank_stages("dualpipev", r, 2) for j in ranges[i]]).state_dict())
            for r in range(2)]
    assert keys[0] | keys[1] == set(model.state_dict())
    assert not keys[0] & keys[1]


def reference_run(cfg, tok, batches, steps, replicas=1, save_at=None) -> list[dict]:
    """The plain trainer on the same batches: `replicas` batches per step = DDP's average."""
    torch.manual_seed(0)
    model = CaptionModel(cfg.model, image_token_id=tok.image_id)
    cfg = cfg.replace(optim=cfg.optim.replace(grad_accum=replicas))
    par = DataParallel(model, cfg, D.DistInfo())
    opt, sched = T.build_optimizer(model, cfg)
    stream, out = FixedStream(batches), []
    for step in range(1, steps + 1):
        out.append(T.train_step(par, opt, sched, stream, cfg))
        if step == save_at:
            save(par, tok, opt, sched, RunState(step=step, data={"epoch": 0, "batch": step}), cfg)
    return out


SCRIPT = """
import json, sys, importlib.util
from pathlib import Path
import torch
spec = importlib.util.spec_from_file_location("helpers", sys.argv[1])
helpers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(helpers)
from mm.model import CaptionModel
from mm.tokenizer import Tokenizer
from train import trainer as T
from train.checkpoints import load_train_state, save
from train.config import TrainConfig
from train.parallel import dist as D, pipeline as P
from train.state import RunState
args = json.loads(Path(sys.argv[2]).read_text())
info = D.setup()
tok = Tokenizer.from_file(args["tokenizer"])
batches = torch.load(args["batches"], weights_only=True)
base = TrainConfig.from_json(args["config"])
grid = P.make_grid(info, base.pipeline.stages)

class Stream:  # replica r of R takes batches r, R + r, 2R + r, ...
    def __init__(self, start):
        self.i = start
    def next(self):
        self.i += grid.dp_size
        return batches[self.i - grid.dp_size + grid.dp_rank]

def build(cfg, seed):
    torch.manual_seed(seed)
    pipe = P.PipelineParallel(CaptionModel(cfg.model, image_token_id=tok.image_id), cfg, grid)
    return (pipe, *T.build_optimizer(pipe.parts, cfg))

results = {}
for schedule in args["schedules"]:
    cfg = base.replace(pipeline=base.pipeline.replace(schedule=schedule), out_dir=args["out"] + "/" + schedule)
    pipe, opt, sched = build(cfg, 0)
    stream, steps = Stream(0), []
    for step in range(1, args["steps"] + 1):
        stats = T.train_step(pipe, opt, sched, stream, cfg)
        steps.append(dict(stats, load=stats["load"].tolist()))
        if step == args["save_at"]:
            save(pipe, tok, opt, sched, RunState(step=step, data={"epoch": 0, "batch": step}), cfg)
    resumed = None
    if args.get("resume_from"):  # a plain trainer checkpoint into a differently seeded pipeline
        pipe, opt, sched = build(cfg, 123)
        state = load_train_state(args["resume_from"], pipe, opt, sched)
        resumed = T.train_step(pipe, opt, sched, Stream(state.step * grid.dp_size), cfg)
        resumed["load"] = resumed["load"].tolist()
    results[schedule] = {"steps": steps, "resumed": resumed}
if info.is_main:
    Path(args["out"], "results.json").write_text(json.dumps(results))
D.teardown()
"""


def launch(tmp_path, tok, cfg, batches, nproc, **args) -> dict:
    (tmp_path / "config.json").write_text(cfg.to_json())
    torch.save(batches, tmp_path / "batches.pt")
    tok.save(tmp_path / "tokenizer.json")
    args = dict(args, config=str(tmp_path / "config.json"), batches=str(tmp_path / "batches.pt"),
                tokenizer=str(tmp_path / "tokenizer.json"), out=str(tmp_path))
    (tmp_path / "args.json").write_text(json.dumps(args))
    (tmp_path / "run.py").write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
                           str(tmp_path / "run.py"), CONFTEST, str(tmp_path / "args.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    (tmp_path / "stderr.txt").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / "results.json").read_text())


def assert_same_steps(got: list[dict], want: list[dict], same_loads: bool = True):
    for step, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        for k in ("loss_main", "loss_mtp", "loss_aux", "grad_norm"):
            assert abs(g[k] - w[k]) < 1e-4, (step, k, g[k], w[k])
        assert g["load_max_over_mean"] == pytest.approx(w["load_max_over_mean"], abs=1e-4), step
        if same_loads:  # tokens routed to each expert, per MoE layer in model order
            assert torch.equal(torch.as_tensor(g["load"]), w["load"]), step


def test_two_rank_pipelines_match_single_process_and_checkpoints_interchange(tmp_path, tok):
    cfg = tiny_cfg(tmp_path / "ref", stages=2, microbatches=4)
    n_image = CaptionModel(cfg.model, image_token_id=tok.image_id).num_image_tokens
    batches = make_batches(tok, 4, 8, n_image)
    want = reference_run(cfg, tok, batches, steps=4, save_at=2)
    assert want[-1]["loss_main"] < want[0]["loss_main"]
    ref_ckpt = tmp_path / "ref" / "checkpoints" / "step-00000002"
    got = launch(tmp_path, tok, cfg, batches, 2, schedules=list(SCHEDULES), steps=3, save_at=2,
                 resume_from=str(ref_ckpt))
    for schedule, result in got.items():
        assert_same_steps(result["steps"], want[:3])
        # plain checkpoint -> pipeline: the resumed pipeline takes the plain run's step 3
        assert_same_steps([result["resumed"]], want[2:3])
        # pipeline checkpoint -> plain trainer: loads strictly and takes the same step 3
        ckpt = tmp_path / schedule / "checkpoints" / "step-00000002"
        model, _ = load_checkpoint(ckpt)
        model.train()
        par = DataParallel(model, cfg, D.DistInfo())
        opt, sched = T.build_optimizer(model, cfg)
        load_train_state(ckpt, par, opt, sched)
        step3 = T.train_step(par, opt, sched, FixedStream(batches, start=2), cfg)
        assert_same_steps([step3], want[2:3])
        saved, plain = load_file(str(ckpt / "model.safetensors")), load_file(str(ref_ckpt / "model.safetensors"))
        assert saved.keys() == plain.keys()


def test_pipeline_x_data_parallel_2x2_matches_gradient_accumulation(tmp_path, tok):
    cfg = tiny_cfg(tmp_path / "ref", stages=2, microbatches=4)
    n_image = CaptionModel(cfg.model, image_token_id=tok.image_id).num_image_tokens
    batches = make_batches(tok, 4, 8, n_image, seed=1)
    want = reference_run(cfg, tok, batches, steps=2, replicas=2)
    got = launch(tmp_path, tok, cfg, batches, 4, schedules=["dualpipev"], steps=2, save_at=0)
    # each replica logs its own loads; the router biases moved with the loads of both
    assert_same_steps(got["dualpipev"]["steps"], want, same_loads=False)


TRAIN_SCRIPT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("helpers", sys.argv[1])
helpers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(helpers)
from train import trainer as T
from train.config import ParallelConfig
from train.parallel import dist as D
cfg = helpers.micro_train_config({"train": sys.argv[2], "test": sys.argv[2]}, sys.argv[3])
cfg = cfg.replace(model=helpers.micro_config(num_hidden_layers=2), eval_every=4, eval_batches=2, log_every=2,
                  save_every=4, pipeline=ParallelConfig(stages=2, schedule="gpipe", microbatches=2))
cfg = cfg.replace(data=cfg.data.replace(val=sys.argv[2]))
for max_steps in (4, 6):  # the second run resumes from the step-4 checkpoint
    T.train(cfg.replace(optim=cfg.optim.replace(max_steps=max_steps, batch_size=8)), resume="auto")
D.teardown()
"""


def test_trainer_runs_the_pipeline_and_resumes(tmp_path, synth_shards):
    script = tmp_path / "train_run.py"
    script.write_text(TRAIN_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(script), CONFTEST, synth_shards["test"], str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = RunLog(tmp_path, True).records()
    assert [r["step"] for r in records] == [2, 4, 6]
    assert records[1]["val_loss"] == records[1]["val_loss"]  # evaluated, and not nan
    # two MoE layers (layer 1 and the MTP block), one on each pipeline rank, gathered in model order
    assert all(r["loss_main"] > 0 and len(r["expert_load_max_over_mean"]) == 2 for r in records)
    model, _ = load_checkpoint(tmp_path / "checkpoints" / "step-00000006")  # a plain Captioner directory
    assert sum(p.numel() for p in model.parameters()) > 0
