"""DraftPolicy: speculation per task only where it has measured faster, outputs unchanged."""

import pytest

from mm.draft_policy import MIN_REQUESTS, RETRY_EVERY, WINDOW, DraftPolicy
from train.data.scenes import render, sample_rng, sample_scene

TASK = (1, 2, 3)


def feed(policy, drafted_s, plain_s, n=MIN_REQUESTS):
    for _ in range(n):
        policy.record(TASK, True, drafted_s * 10, 10)
        policy.record(TASK, False, plain_s * 10, 10)


def test_alternates_until_both_sides_are_measured():
    p = DraftPolicy()
    choices = []
    for _ in range(2 * MIN_REQUESTS):
        drafted = p.speculate(TASK)
        choices.append(drafted)
        p.record(TASK, drafted, 1.0, 10)
    assert choices == [True, False] * MIN_REQUESTS
    assert p.seconds_per_token(TASK) == (pytest.approx(0.1), pytest.approx(0.1))


@pytest.mark.parametrize("drafted_s, plain_s, want", [(1.0, 2.0, True), (2.0, 1.0, False)])
def test_takes_the_faster_side_and_retries_the_other(drafted_s, plain_s, want):
    p = DraftPolicy()
    feed(p, drafted_s, plain_s)
    choices = [p.speculate(TASK) for _ in range(2 * RETRY_EVERY)]
    assert choices.count(not want) == 2  # once every RETRY_EVERY requests, to keep its figure fresh
    assert all(c == want for i, c in enumerate(choices, 1) if i % RETRY_EVERY)
    assert p.speculate((9,)) is True  # another task starts over


def test_figures_are_tokens_weighted_over_a_window():
    p = DraftPolicy()
    for seconds, tokens in [(1.0, 1), (1.0, 9), (3.0, 10)]:
        p.record(TASK, False, seconds, tokens)
    p.record(TASK, False, 5.0, 0)  # a request that decoded nothing after its first token: no figure
    assert p.seconds_per_token(TASK)[0] == pytest.approx(5.0 / 20)
    for _ in range(WINDOW):
        p.record(TASK, False, 1.0, 1)
    assert p.seconds_per_token(TASK)[0] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def bundled():
    from mm.captioner import Captioner

    return Captioner.from_pretrained(None, device="cpu")


def test_the_captioner_drafts_only_where_it_measured_faster(bundled):
    from mm.draft_policy import DraftPolicy

    image = render(sample_scene(sample_rng("test", 31, 0)))
    task = tuple(bundled.prefix("describe")[0].tolist())
    plain = bundled.run(image, task="describe")
    try:
        for drafted_s, plain_s, want in [(1.0, 2.0, True), (2.0, 1.0, False)]:
            bundled.draft_policy = DraftPolicy()
            for _ in range(MIN_REQUESTS):
                bundled.draft_policy.record(task, True, drafted_s, 1)
                bundled.draft_policy.record(task, False, plain_s, 1)
            got = bundled.run(image, task="describe", speculative=True)
            assert got.stats.speculative is want and (got.stats.drafts > 0) is want
            assert got.texts == plain.texts
            # a depth asked for drafts whatever the policy says
            assert bundled.run(image, task="describe", speculative=True, draft_tokens=2).stats.drafts > 0
        bundled.draft_policy = None  # no policy: speculation always drafts
        assert bundled.run(image, task="describe", speculative=True).stats.drafts > 0
    finally:
        bundled.draft_policy = DraftPolicy()


def test_every_single_image_request_is_measured(bundled):
    from mm.draft_policy import DraftPolicy

    bundled.draft_policy = policy = DraftPolicy()
    image = render(sample_scene(sample_rng("test", 31, 1)))
    task = tuple(bundled.prefix("caption")[0].tolist())
    runs = [bundled.run(image, speculative=s) for s in (True, False, True, False, True, False)]
    assert [r.stats.speculative for r in runs] == [True, False] * 3  # alternating while measuring
    plain_s, drafted_s = policy.seconds_per_token(task)
    tokens = runs[1].stats.new_tokens - 1  # after the first token, which the prefill gives
    assert plain_s == pytest.approx(sum(r.stats.decode_s for r in runs[1::2]) / (3 * tokens))
    assert drafted_s == pytest.approx(sum(r.stats.decode_s for r in runs[0::2]) / (3 * tokens))
    bundled.run([image, image], speculative=False)  # a batch: its rows' cost is not one request's
    assert policy.seconds_per_token(task) == (plain_s, drafted_s)


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
