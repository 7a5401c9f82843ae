"""Generation invariants: cached decoding == repeated full forwards, speculative == greedy,
batched == one at a time, and the option checks."""

import pytest
import torch

from mm.checkpoint import load_checkpoint
from mm.generate import GenerationConfig, generate
from train.data.scenes import render, sample_rng, sample_scene
from vision.preprocess import build_transform


@pytest.fixture(scope="module")
def loaded(trained_micro):
    model, tok = load_checkpoint(trained_micro)
    tf = build_transform(model.vision.data_config)
    images = torch.stack([tf(render(sample_scene(sample_rng("test", 5, i)))) for i in range(3)])
    return model, tok, images


def prefix(model, tok, task, n):
    return torch.tensor([tok.build_prompt(model.cfg.tasks[task], model.num_image_tokens)] * n)


def greedy_by_full_forwards(model, tok, image, task, max_new):
    """Reference decoder: no cache, the whole sequence re-run for every new token."""
    ids = prefix(model, tok, task, 1)
    image_embeds = model.encode_images(image[None])
    out = []
    for _ in range(max_new):
        logits = model.lm(inputs_embeds=model.embed(ids, image_embeds))
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt == tok.eos_id:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


@pytest.mark.parametrize("task", ["caption", "describe"])
def test_cached_greedy_equals_full_forward_greedy(loaded, task):
    model, tok, images = loaded
    with torch.no_grad():
        ref = greedy_by_full_forwards(model, tok, images[0], task, 24)
    got, _ = generate(model, images[:1], prefix(model, tok, task, 1),
                      GenerationConfig(max_new_tokens=24), tok.eos_id)
    assert got[0] == ref


@pytest.mark.parametrize("draft_tokens", [1, 3])
@pytest.mark.parametrize("task", ["caption", "describe", "describe_zh"])
def test_speculative_equals_greedy(loaded, task, draft_tokens):
    model, tok, images = loaded
    p = prefix(model, tok, task, len(images))
    plain, s1 = generate(model, images, p, GenerationConfig(max_new_tokens=40), tok.eos_id)
    gen = GenerationConfig(max_new_tokens=40, speculative=True, draft_tokens=draft_tokens)
    spec, s2 = generate(model, images, p, gen, tok.eos_id)
    assert spec == plain
    assert s2.speculative and not s1.speculative
    assert s2.drafts > 0 and 0.0 <= s2.acceptance <= 1.0
    # each verification emits its accepted drafts plus the model's own next token, except a
    # row's last one, which <eos> or the length limit may cut; the prefill gives each row one
    assert s2.accepted + s2.forwards <= s2.new_tokens <= s2.rows + s2.accepted + s2.forwards
    assert s1.tokens_per_forward == pytest.approx(1.0)


def test_batched_equals_one_at_a_time(loaded):
    model, tok, images = loaded
    batched, _ = generate(model, images, prefix(model, tok, "caption", 3),
                          GenerationConfig(max_new_tokens=20), tok.eos_id)
    singles = [generate(model, images[i : i + 1], prefix(model, tok, "caption", 1),
                        GenerationConfig(max_new_tokens=20), tok.eos_id)[0][0] for i in range(3)]
    assert batched == singles


def test_beam_search_one_beam_is_greedy_and_beams_score_at_least_as_well(loaded):
    model, tok, images = loaded
    p = prefix(model, tok, "caption", 2)
    greedy, _ = generate(model, images[:2], p, GenerationConfig(max_new_tokens=16), tok.eos_id)
    beams, _ = generate(model, images[:2], p, GenerationConfig(max_new_tokens=16, num_beams=4,
                                                                length_penalty=0.0), tok.eos_id)

    def logprob(image, seq):
        ids = torch.cat([p[:1], torch.tensor([seq])], 1)
        logits = model.lm(inputs_embeds=model.embed(ids, model.encode_images(image[None])))
        lp = logits[0, p.shape[1] - 1 : -1].log_softmax(-1)
        return float(lp.gather(1, torch.tensor(seq)[:, None]).sum())

    with torch.no_grad():
        for i in range(2):
            assert logprob(images[i], beams[i]) >= logprob(images[i], greedy[i]) - 1e-4


def test_sampling_is_seeded_and_min_tokens_holds(loaded):
    model, tok, images = loaded
    p = prefix(model, tok, "caption", 2)
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7, min_new_tokens=5)
    a, _ = generate(model, images[:2], p, cfg, tok.eos_id)
    b, _ = generate(model, images[:2], p, cfg, tok.eos_id)
    assert a == b
    for row in a:
        assert tok.eos_id not in row[:5]


def test_repetition_penalty_changes_scores_not_shapes(loaded):
    model, tok, images = loaded
    p = prefix(model, tok, "describe", 1)
    out, stats = generate(model, images[:1], p, GenerationConfig(max_new_tokens=30, repetition_penalty=3.0),
                          tok.eos_id)
    assert 1 <= len(out[0]) <= 30 and stats.new_tokens == len(out[0])


@pytest.mark.parametrize("bad, word", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_p=0.0), "top_p"),
    (dict(num_beams=2, temperature=0.5), "beam"), (dict(temperature=-1), "temperature"),
    (dict(draft_tokens=0), "draft_tokens"),
])
def test_bad_options_are_named(bad, word):
    with pytest.raises(ValueError, match=word):
        GenerationConfig(**bad).validate()


def test_expert_load_is_reported(loaded):
    model, tok, images = loaded
    p = prefix(model, tok, "caption", 1)
    _, stats = generate(model, images[:1], p, GenerationConfig(max_new_tokens=8), tok.eos_id)
    n_moe = sum(1 for i in range(model.cfg.lm.num_hidden_layers) if model.cfg.lm.is_moe_layer(i))
    assert len(stats.expert_load) == n_moe
    # every position fed to the model (prefill + one per decode step) is routed to k experts
    fed = p.shape[1] + stats.forwards
    for layer in stats.expert_load:
        assert sum(layer) == model.cfg.lm.num_experts_per_tok * fed


def test_chained_drafts_on_the_bundled_model_are_exact_and_mostly_accepted():
    """On a trained model chained MTP drafts are accepted often, and the text is greedy's;
    max_new_tokens cutting a round of accepted drafts short is exact too."""
    from mm.captioner import Captioner

    cap = Captioner.from_pretrained(None, device="cpu")
    images = [render(sample_scene(sample_rng("test", 5, i))) for i in range(4)]
    for task in ("describe", "describe_zh"):
        plain = cap.run(images, task=task)
        chained = cap.run(images, task=task, speculative=True, draft_tokens=3)
        assert chained.texts == plain.texts
        assert chained.stats.acceptance > 0.5 and chained.stats.tokens_per_forward > 2.0
    for limit in (2, 3, 7):
        short = cap.run(images[:1], task="describe", max_new_tokens=limit)
        chained = cap.run(images[:1], task="describe", max_new_tokens=limit, speculative=True, draft_tokens=3)
        assert chained.texts == short.texts and chained.stats.new_tokens == short.stats.new_tokens == limit


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_fast_decoder_gives_the_reference_tokens_on_the_bundled_model(dtype):
    """lm.Decoder (fused weights, one-buffer cache, experts by views) decodes the bundled model
    token for token as the reference path through Transformer.forward, batched and speculative."""
    from lm import Reference
    from mm.captioner import Captioner

    cap = Captioner.from_pretrained(None, device="cpu", dtype=dtype)
    images = [render(sample_scene(sample_rng("test", 6, i))) for i in range(4)]
    fast = cap.decoder
    for task, options in [("caption", {}), ("describe", {}), ("caption_zh", {}), ("describe_zh", {}),
                          ("describe", {"speculative": True, "draft_tokens": 4})]:
        cap.decoder = Reference(cap.model.lm)
        want = cap.run(images, task=task, **options)
        cap.decoder = fast
        got = cap.run(images, task=task, **options)
        assert got.texts == want.texts, (task, options)
        if dtype == "fp32":
            assert got.stats.expert_load == want.stats.expert_load, (task, options)
        else:  # bf16 rounds the two paths' sums differently: a near-tie in routing may flip
            a, b = torch.tensor(got.stats.expert_load), torch.tensor(want.stats.expert_load)
            assert a.sum() == b.sum() and (a - b).abs().sum() <= 0.02 * b.sum(), (task, options)


@pytest.fixture(scope="module")
def bundled():
    from mm.captioner import Captioner

    return Captioner.from_pretrained(None, device="cpu")


def test_speculation_honours_min_new_tokens(bundled):
    """min_new_tokens holds with speculation as without it (the drafts' verification once took
    the argmax of the raw logits, so a caption ended before the minimum)."""
    image = render(sample_scene(sample_rng("test", 9, 0)))
    short = bundled.run(image, task="caption")
    assert short.stats.new_tokens < 30  # the minimum below changes this caption
    plain = bundled.run(image, task="caption", min_new_tokens=30)
    spec = bundled.run(image, task="caption", min_new_tokens=30, speculative=True, draft_tokens=4)
    assert spec.stats.speculative and plain.stats.new_tokens >= 30
    assert spec.texts == plain.texts and spec.stats.new_tokens == plain.stats.new_tokens


def test_speculation_equals_plain_greedy_across_options(bundled):
    """Random greedy options, speculative on and off: the same tokens, the same confidence."""
    import random

    rnd = random.Random(25)
    images = [render(sample_scene(sample_rng("test", 10, i))) for i in range(2)]
    for _ in range(4):
        max_new = rnd.choice([1, 5, 24, 48])
        options = dict(task=rnd.choice(bundled.tasks), max_new_tokens=max_new,
                       min_new_tokens=rnd.randint(0, max_new), draft_tokens=rnd.choice([None, 1, 2, 6]),
                       repetition_penalty=rnd.choice([1.0, 1.0, 1.3]))
        plain = bundled.run(images, **options)
        spec = bundled.run(images, speculative=True, **options)
        assert spec.texts == plain.texts, options
        assert spec.stats.new_tokens == plain.stats.new_tokens, options
        assert spec.confidence == pytest.approx(plain.confidence, abs=1e-4), options
        if options["draft_tokens"] is not None:  # else the captioner's DraftPolicy chooses whether to draft
            assert spec.stats.speculative == (options["repetition_penalty"] == 1.0), options


@pytest.mark.slow
def test_compiled_speculation_equals_plain_greedy():
    """compile=True compiles the draft step with the main one; outputs stay plain greedy's."""
    from mm.captioner import Captioner

    cap = Captioner.from_pretrained(None, device="cpu", compile=True)
    images = [render(sample_scene(sample_rng("test", 11, i))) for i in range(3)]
    for task in ("caption", "describe"):
        plain = cap.run(images, task=task, min_new_tokens=3)
        spec = cap.run(images, task=task, min_new_tokens=3, speculative=True, draft_tokens=4)
        assert spec.texts == plain.texts and spec.stats.speculative and spec.stats.acceptance > 0.5
