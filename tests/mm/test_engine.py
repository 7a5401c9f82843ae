"""The continuous-batching engine: each request's output is what it gets alone, whatever shares the batch."""

import random
import time

import pytest

from mm.captioner import Captioner
from mm.engine import Cancelled, Engine, EngineBusy
from train.data.scenes import render, sample_rng, sample_scene
from vision.preprocess import ImageError

TASKS = ("caption", "describe", "caption_zh", "describe_zh")


@pytest.fixture(scope="module")
def bundled():
    cap = Captioner.from_pretrained(None, device="cpu")
    engine = Engine(cap, max_batch=6, max_new_tokens=64)
    yield cap, engine
    engine.close()


@pytest.fixture(scope="module")
def random_tiny(tiny_app_checkpoint):
    cap = Captioner.from_pretrained(tiny_app_checkpoint, device="cpu")
    return cap


def test_mixed_batch_equals_each_request_alone(bundled):
    """Random tasks, lengths, minimum lengths, sampling rows and arrival times; more requests than
    rows, so rows are retired and refilled while others run. Text and tokens match lone runs with
    speculation on or off (expert load: against plain lone runs, which route the same tokens)."""
    cap, engine = bundled
    rnd = random.Random(0)
    jobs = []
    for i in range(14):
        opts = {"max_new_tokens": rnd.choice([5, 12, 64])}
        if rnd.random() < 0.3:
            opts.update(temperature=rnd.choice([0.7, 1.3]), top_p=rnd.choice([1.0, 0.9]), seed=rnd.randrange(100))
        elif rnd.random() < 0.3:
            opts.update(repetition_penalty=1.2)
        if rnd.random() < 0.4:
            opts.update(min_new_tokens=rnd.randint(0, opts["max_new_tokens"]))
        jobs.append((render(sample_scene(sample_rng("test", 77, i))), rnd.choice(TASKS), opts))
    requests = []
    for image, task, opts in jobs:
        requests.append(engine.submit(image, task, **opts))
        time.sleep(rnd.choice([0, 0, 0.01, 0.05]))  # some arrive while others are mid-decode
    results = [r.result(timeout=120) for r in requests]
    for i, ((image, task, opts), got) in enumerate(zip(jobs, results)):
        alone = cap.run(image, task, speculative=False, **opts)
        assert got.text == alone.texts[0], (task, opts)
        assert got.stats.expert_load == alone.stats.expert_load, (task, opts)
        assert got.stats.new_tokens == alone.stats.new_tokens
        if i % 2 == 0:  # the same request alone through MTP speculation (greedy rows use it)
            assert cap.run(image, task, speculative=True, draft_tokens=4, **opts).texts == alone.texts, (task, opts)
    assert engine.busy_rows == 0


def test_stream_joins_to_the_text_and_beams_and_speculation_match(bundled):
    cap, engine = bundled
    image = render(sample_scene(sample_rng("test", 78, 0)))
    req = engine.submit(image, "describe_zh")
    assert "".join(req.stream(timeout=60)) == req.result().text == cap.caption(image, "describe_zh")
    assert engine.submit(image, "caption", num_beams=3).result(timeout=60).text == cap.caption(image, num_beams=3)
    spec = engine.submit(image, "describe", speculative=True, draft_tokens=3).result(timeout=60)
    assert spec.text == cap.caption(image, "describe", speculative=True, draft_tokens=3)


def test_bad_requests_fail_on_submit(bundled, tmp_path):
    _, engine = bundled
    image = render(sample_scene(sample_rng("test", 78, 1)))
    with pytest.raises(ValueError, match="poem"):
        engine.submit(image, "poem")
    with pytest.raises(ValueError, match="temperature"):
        engine.submit(image, temperature=-1.0)
    with pytest.raises(ValueError, match="at most 64"):
        engine.submit(image, max_new_tokens=65)
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match="x.png"):
        engine.submit(tmp_path / "x.png")
    assert engine.submit(image).result(timeout=60).text  # still serving


def test_cancel_frees_the_row_and_a_full_queue_says_busy(random_tiny):
    """The random model rarely ends a sentence, so its requests run to max_new_tokens."""
    engine = Engine(random_tiny, max_batch=1, max_queue=1, max_new_tokens=256)
    image = render(sample_scene(sample_rng("test", 79, 0)))
    try:
        running = engine.submit(image, max_new_tokens=256)
        next(running.stream(timeout=60))  # it holds the only row now
        waiting = engine.submit(image, max_new_tokens=256)
        with pytest.raises(EngineBusy, match="busy"):
            engine.submit(image)  # one running, one waiting: the queue of one is full
        waiting.cancel()
        running.cancel()
        with pytest.raises(Cancelled):
            running.result(timeout=60)
        with pytest.raises(Cancelled):
            waiting.result(timeout=60)
        assert engine.busy_rows == 0
        assert engine.submit(image, max_new_tokens=3).result(timeout=60).tokens  # the row serves again
    finally:
        engine.close()


def test_a_failing_forward_fails_its_requests_and_the_engine_serves_on(random_tiny, monkeypatch):
    engine = Engine(random_tiny, max_batch=4)
    image = render(sample_scene(sample_rng("test", 79, 1)))
    try:
        def broken(*a, **k):
            raise RuntimeError("injected failure")

        monkeypatch.setattr(engine.model, "encode", broken)
        with pytest.raises(RuntimeError, match="injected"):
            engine.submit(image, max_new_tokens=3).result(timeout=60)
        monkeypatch.undo()
        assert engine.submit(image, max_new_tokens=3).result(timeout=60).tokens
    finally:
        engine.close()
