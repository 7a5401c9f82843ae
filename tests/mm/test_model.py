"""CaptionModel's loss and config: the loss normalised by counts the caller gives is the same
function for a whole batch and its microbatches, and the LM config has one owner."""

import sys
from pathlib import Path

import torch

import lm
from mm.model import CaptionModel, caption_loss

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for conftest helpers
from conftest import micro_config  # noqa: E402


def test_microbatch_losses_with_the_batch_counts_add_up_to_the_batch_loss():
    torch.manual_seed(0)
    b, t, v = 4, 9, 11
    logits, mtp = torch.randn(b, t, v), [torch.randn(b, t - 1, v)]
    labels = torch.randint(0, v, (b, t))
    labels[:, :3] = lm.IGNORE_INDEX
    labels[1, 5:] = lm.IGNORE_INDEX  # rows with different numbers of targets
    aux = torch.tensor([0.25])
    whole = caption_loss(logits, mtp, aux, labels, 0.3)
    counts = lm.target_counts(labels, 1)
    parts = [caption_loss(logits[i:i + 2], [mtp[0][i:i + 2]], aux, labels[i:i + 2], 0.3, counts, share=0.5)
             for i in (0, 2)]
    for name in ("loss", "main", "mtp", "aux"):
        assert torch.allclose(sum(getattr(p, name) for p in parts), getattr(whole, name), atol=1e-6), name


def test_the_language_model_owns_the_lm_config():
    model = CaptionModel(micro_config(), image_token_id=3)
    model.lm.cfg = model.lm.cfg.replace(mtp_depths=2)
    assert model.cfg.lm.mtp_depths == 2 and model.cfg.lm is model.lm.cfg
    model.cfg = model.cfg.replace(lm=model.cfg.lm.replace(mtp_lambda=0.5), max_text_len=20)
    assert model.lm.cfg.mtp_lambda == 0.5 and model.cfg.max_text_len == 20
