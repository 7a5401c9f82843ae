"""DraftPolicy: speculation per task only where it has measured faster, outputs unchanged."""

import pytest

from mm.draft_policy import MAX_DRAFTS, MIN_REQUESTS, RETRY_EVERY, WINDOW, DraftPolicy, depths
from mm.generate import GenerationConfig
from train.data.scenes import render, sample_rng, sample_scene

TASK = (1, 2, 3)


def feed(policy, seconds_per_token, n=MIN_REQUESTS):
    for _ in range(n):
        for depth, seconds in seconds_per_token.items():
            policy.record(TASK, depth, seconds * 10, 10)


def test_the_depths_tried():
    assert depths(4) == (4, 0, 8) and depths(1) == (1, 0, 2) and depths(6) == (6, 0, 8) and depths(8) == (8, 0)
    assert GenerationConfig.LIMITS["draft_tokens"].hi == MAX_DRAFTS


def test_each_depth_is_measured_before_one_is_chosen():
    p = DraftPolicy()
    choices = []
    for _ in range(3 * MIN_REQUESTS):
        k = p.depth(TASK, 4)
        choices.append(k)
        p.record(TASK, k, 1.0, 10)
    assert choices == [4, 0, 8] * MIN_REQUESTS
    assert p.speedups(TASK) == {0: (1.0, 0.0), 4: pytest.approx((1.0, 0.0)), 8: pytest.approx((1.0, 0.0))}
    assert p.depth(TASK, 4) == 0  # no depth measured faster than plain decoding


@pytest.mark.parametrize("fastest", [0, 4, 8])
def test_takes_the_fastest_depth_and_retries_the_others(fastest):
    p = DraftPolicy()
    feed(p, {k: (1.0 if k == fastest else 2.0) for k in (0, 4, 8)})
    choices = [p.depth(TASK, 4) for _ in range(2 * RETRY_EVERY)]
    others = [c for i, c in enumerate(choices, 1) if i % RETRY_EVERY == 0]
    assert sorted(others) == sorted(k for k in (0, 4, 8) if k != fastest)  # in turn, to keep their figures fresh
    assert all(c == fastest for i, c in enumerate(choices, 1) if i % RETRY_EVERY)
    assert p.depth((9,), 4) == 4  # another task starts over, at the trained depth


def test_a_depth_is_taken_when_faster_beyond_its_noise():
    """Mean speed-up less one standard error: 1.1x with requests at 0.6x and 1.6x is noise,
    1.1x with requests at 1.08x and 1.12x is not."""
    p = DraftPolicy()
    feed(p, {0: 1.0, 8: 2.0})
    for ratio in (0.6, 1.6, 0.6, 1.6):
        p.record(TASK, 4, 10 / ratio, 10)  # 10 tokens at the plain price of 1 s each, in 10/ratio seconds
    mean, se = p.speedups(TASK)[4]
    assert mean == pytest.approx(1.1) and se == pytest.approx(0.5 / 4**0.5 * 2 / 3**0.5, rel=1e-6)
    assert p.depth(TASK, 4) == 0
    for ratio in (1.08, 1.12) * (WINDOW // 2):
        p.record(TASK, 4, 10 / ratio, 10)
    assert p.speedups(TASK)[4][0] == pytest.approx(1.1) and p.depth(TASK, 4) == 4


def test_of_the_depths_surely_faster_the_best_mean_is_taken():
    """A deeper chain varies more from request to request; sure enough to beat plain decoding,
    its better mean wins over a steadier but slower depth."""
    p = DraftPolicy()
    feed(p, {0: 1.0})
    for fast, steady in zip((1.1, 1.7, 1.1, 1.7), (1.24, 1.26, 1.24, 1.26)):
        p.record(TASK, 8, 10 / fast, 10)
        p.record(TASK, 4, 10 / steady, 10)
    (m8, e8), (m4, e4) = p.speedups(TASK)[8], p.speedups(TASK)[4]
    assert m8 - e8 < m4 - e4 and m8 - e8 > 1.0 and m8 > m4
    assert p.depth(TASK, 4) == 8


def test_a_depth_is_judged_per_request_against_the_plain_price():
    """Each request's tokens priced at plain decoding's seconds per token, over its own seconds:
    a depth that happened to get short outputs (whose fixed cost weighs more) is not judged
    by their total alone."""
    p = DraftPolicy()
    for seconds, tokens in [(1.0, 10), (3.0, 30), (2.0, 20), (4.0, 40)]:
        p.record(TASK, 0, seconds, tokens)  # 0.1 s a token whatever the length
    for seconds, tokens in [(0.5, 10), (2.0, 40), (1.0, 5), (0.4, 8)]:
        p.record(TASK, 4, seconds, tokens)
    assert p.speedups(TASK)[4][0] == pytest.approx((2.0 + 2.0 + 0.5 + 2.0) / 4)
    p.record(TASK, 0, 5.0, 0)  # a request that decoded nothing after its first token: no figure
    assert p.measured(TASK) == {0: 4, 4: 4}
    for _ in range(WINDOW):
        p.record(TASK, 0, 0.2, 1)
    assert p.speedups(TASK)[4][0] == pytest.approx(2 * (2.0 + 2.0 + 0.5 + 2.0) / 4)  # only the window counts


@pytest.fixture(scope="module")
def bundled():
    from mm.captioner import Captioner

    return Captioner.from_pretrained(None, device="cpu")


def test_the_captioner_drafts_as_deep_as_measured_fastest(bundled):
    image = render(sample_scene(sample_rng("test", 31, 0)))
    task = tuple(bundled.prefix("describe")[0].tolist())
    plain = bundled.run(image, task="describe")
    try:
        for fastest in (0, 4, 8):
            bundled.draft_policy = DraftPolicy()
            for _ in range(MIN_REQUESTS):
                for k in (0, 4, 8):
                    bundled.draft_policy.record(task, k, 1.0 if k == fastest else 2.0, 1)
            got = bundled.run(image, task="describe", speculative=True)
            assert got.stats.speculative is (fastest > 0) and got.texts == plain.texts
            rounds = got.stats.forwards
            assert got.stats.drafts <= fastest * rounds and (fastest <= 4 or got.stats.drafts > 4 * rounds)
            # a depth asked for drafts whatever the policy says
            assert bundled.run(image, task="describe", speculative=True, draft_tokens=2).stats.drafts > 0
        bundled.draft_policy = None  # no policy: speculation always drafts
        assert bundled.run(image, task="describe", speculative=True).stats.drafts > 0
    finally:
        bundled.draft_policy = DraftPolicy()


def test_every_single_image_request_is_measured(bundled):
    bundled.draft_policy = policy = DraftPolicy()
    image = render(sample_scene(sample_rng("test", 31, 1)))
    task = tuple(bundled.prefix("caption")[0].tolist())
    runs = [bundled.run(image, speculative=True) for _ in range(3 * MIN_REQUESTS)]
    assert [r.stats.depth for r in runs] == [4, 0, 8] * MIN_REQUESTS  # in turn while measuring
    price = sum(r.stats.decode_s for r in runs[1::3]) / sum(r.stats.new_tokens - 1 for r in runs[1::3])
    speedups = policy.speedups(task)
    for k, first in ((4, 0), (8, 2)):  # tokens after the first (which the prefill gives) at the plain price
        want = sum((r.stats.new_tokens - 1) * price / r.stats.decode_s for r in runs[first::3]) / MIN_REQUESTS
        assert speedups[k][0] == pytest.approx(want)
    bundled.run([image, image], speculative=False)  # a batch: its rows' cost is not one request's
    bundled.run(image, speculative=True, draft_tokens=3)  # a depth asked for is not one the policy chose
    assert policy.speedups(task) == speedups
    bundled.run(image, speculative=False)  # a plain request counts for depth 0
    assert policy.measured(task) == {0: MIN_REQUESTS + 1, 4: MIN_REQUESTS, 8: MIN_REQUESTS}


def test_a_batch_decodes_together_unless_a_depth_is_asked_for(bundled):
    """Speculation decodes rows one at a time, so with a policy a batch decodes plainly, rows
    together (the same text); a depth asked for still drafts row by row."""
    images = [render(sample_scene(sample_rng("test", 31, i))) for i in range(3)]
    plain = bundled.run(images, task="describe")
    default = bundled.run(images, task="describe", speculative=True)
    asked = bundled.run(images, task="describe", speculative=True, draft_tokens=4)
    assert default.texts == asked.texts == plain.texts
    assert not default.stats.speculative and default.stats.drafts == 0
    assert asked.stats.speculative and asked.stats.drafts > 0
