"""Tiny LM configs for the lm tests: two layers (dense then MoE), small MLA, a few experts."""

import pytest
import torch

import lm
from lm import LMConfig

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def _tiny_config(**changes) -> LMConfig:
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=48, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64, n_routed_experts=8,
                n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
                first_k_dense_replace=1, n_group=2, topk_group=1, num_nextn_predict_layers=1,
                initializer_range=0.1)
    base.update(changes)
    return LMConfig(**base)


@pytest.fixture
def tiny_config():
    """Factory: tiny_config(**changes) -> LMConfig."""
    return _tiny_config


def _random_model(**changes) -> lm.Transformer:
    model = lm.Transformer(_tiny_config(**changes))
    with torch.no_grad():
        for m in lm.moe_layers(model):
            if m.gate.bias is not None:
                m.gate.bias.normal_(0, 0.1)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))  # norms away from 1 so a mix-up would show
    return model.eval()


@pytest.fixture
def random_model():
    """Factory: random_model(**changes) -> an eval-mode Transformer with non-zero router
    biases and norms away from 1, so a mixed-up tensor changes the outputs."""
    return _random_model


@pytest.fixture
def yarn():
    """A YaRN rope_scaling dict (factor 4 over an original context of 16)."""
    return dict(YARN)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second OpenMP thread only adds synchronisation, which on a
    busy shared machine costs more than the work itself. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
