"""The sampler's rules: verification over drafts == the same rules one step at a time."""

import pytest
import torch

from mm.generate import GenerationConfig
from mm.sampling import Sampler, choose, cut, make_rng, process, verify


@pytest.mark.parametrize("min_new, step", [(0, 0), (3, 1), (9, 2)])
def test_verify_applies_the_step_rules_per_position(min_new, step):
    gen = GenerationConfig(min_new_tokens=min_new, max_new_tokens=16)
    g = torch.Generator().manual_seed(step)
    logits = torch.randn(5, 11, generator=g)
    logits[:, 0] += 3.0  # <eos> (id 0) often the best
    one_at_a_time = [int(choose(process(logits[i:i + 1], torch.zeros(1, 0, dtype=torch.long), step + i, gen, 0),
                                gen, None)) for i in range(5)]
    new, accepted = verify(logits, one_at_a_time[:4], step, gen, 0)
    assert new == one_at_a_time and accepted == 4
    wrong = [t + 1 for t in one_at_a_time[:4]]
    assert verify(logits, wrong, step, gen, 0) == ([one_at_a_time[0]], 0)


def test_stop_rule_and_sampler_state():
    gen = GenerationConfig(max_new_tokens=4)
    assert cut([5, 6, 0, 7], 0, gen, 0) == [5, 6, 0]
    assert cut([5, 6, 7], 2, gen, 0) == [5, 6]
    s = Sampler(gen, 0, 2, "cpu")
    logits = torch.full((2, 8), -5.0)
    logits[0, 0] = logits[1, 3] = 5.0  # row 0 ends at once, row 1 goes on
    fed, new = s.next(logits)
    assert new == [[0], [3]] and fed.tolist() == [0, 3] and s.ended == [True, False]
    fed, new = s.next(logits.flip(0))
    assert new == [[], [0]] and s.finished
    top = float(logits[0].log_softmax(-1)[0])  # each row counts only its own tokens, not the <eos> after
    assert s.mean_logprob().tolist() == pytest.approx([top, top])


def test_sampling_is_seeded():
    gen = GenerationConfig(temperature=0.8, top_k=5, top_p=0.9, seed=3)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    a = choose(process(logits, torch.zeros(3, 0, dtype=torch.long), 0, gen, 0), gen, make_rng(gen, "cpu"))
    b = choose(process(logits, torch.zeros(3, 0, dtype=torch.long), 0, gen, 0), gen, make_rng(gen, "cpu"))
    assert torch.equal(a, b) and make_rng(GenerationConfig(), "cpu") is None
