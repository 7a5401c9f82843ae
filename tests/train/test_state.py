"""The typed run state: counted by the loop, saved by the one checkpoint writer and restored
exactly (with the model, optimiser, scheduler and RNG) by its reader."""

import random
import sys
from pathlib import Path

import torch

from mm.model import CaptionModel
from mm.tokenizer import Tokenizer
from train.checkpoints import load_train_state, save
from train.config import TrainConfig
from train.optim import build_optimizer
from train.parallel.data_parallel import DataParallel
from train.parallel.dist import DistInfo
from train.state import RunState

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for conftest helpers
from conftest import micro_config  # noqa: E402


def test_count_tracks_steps_skips_and_the_window():
    state = RunState()
    for skipped in (False, True, True, False, True):
        state.count({"skipped": skipped, "tokens": 5, "images": 2}, {"epoch": 0, "batch": state.step + 1})
    assert (state.step, state.skipped, state.bad_steps, state.data["batch"]) == (5, 3, 1, 5)
    assert len(state.log_window) == 5


def test_run_state_round_trips_through_a_checkpoint(tmp_path):
    tok_path = tmp_path / "tokenizer.json"
    Tokenizer.train(["a red circle", "a blue square"], vocab_size=300).save(tok_path)
    tok = Tokenizer.from_file(tok_path)
    cfg = TrainConfig(model=micro_config(), out_dir=str(tmp_path / "run"), precision="fp32")
    par = DataParallel(CaptionModel(cfg.model, image_token_id=tok.image_id), cfg, DistInfo())
    opt, sched = build_optimizer(par.parts, cfg)
    opt.step()  # no gradients: only the step count moves
    sched.step()
    state = RunState(step=7, data={"epoch": 2, "batch": 3, "skipped_earlier": {"bad_json": 1}}, bad_steps=1,
                     skipped=2, log_window=[{"skipped": False, "loss_main": 1.5, "tokens": 40, "images": 4}])
    random.seed(11)
    torch.manual_seed(11)
    path = save(par, tok, opt, sched, state, cfg)
    draws = (random.random(), torch.rand(3))

    other = DataParallel(CaptionModel(cfg.model, image_token_id=tok.image_id), cfg, DistInfo())
    opt2, sched2 = build_optimizer(other.parts, cfg)
    back = load_train_state(path, other, opt2, sched2)
    want = RunState(**{**state.to_dict(), "log_window": [dict(state.log_window[0], tokens=0, images=0)]})
    assert back == want  # throughput counts are this process's own: a resumed window restarts them
    py, pt = random.random(), torch.rand(3)  # the RNG continues where the saved run's did
    assert py == draws[0] and torch.equal(pt, draws[1])
    assert sched2.state_dict()["last_epoch"] == 1
    got, saved = other.parts.state_dict(), par.parts.state_dict()
    assert [k for k in saved if not torch.equal(saved[k], got[k])] == []
