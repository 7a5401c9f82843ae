"""The HTTP route and the server under abuse: whatever bytes a client sends, the answer is an
OpenAI-shaped JSON error or a caption, never a plain-text 500 or a hang; a flood past the queue
is refused without stalling the other routes; impossible server options stop start-up.

The route runs on uvicorn over a random tiny checkpoint (no Gradio page: it is the route under
test, and it starts in a fraction of a second)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import io
import json
import math
import socket
import threading
import time

import gradio as gr
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import app
from mm import openai_api
from mm.captioner import Captioner
from mm.engine import Engine, EngineClosed
from mm.openai_api import router

URL = "/v1/chat/completions"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_url(size=(16, 16), colour="red") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


PNG = png_url()


def chat(text="caption", url=PNG, **extra) -> dict:
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": "m", "messages": [{"role": "user", "content": parts}], "max_tokens": 2, **extra}


@contextlib.contextmanager
def api_server(engine: Engine):
    api = FastAPI()
    api.include_router(router(engine, "mm-test", 256))
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=free_port(), log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def cap(tiny_app_checkpoint):
    return Captioner.from_pretrained(tiny_app_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def served(cap):
    engine = Engine(cap, max_batch=4, max_queue=64, max_new_tokens=256)
    with api_server(engine) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, engine
    engine.close()


def assert_openai_error(r: httpx.Response, status: int | None = None, param_in: str = ""):
    assert r.status_code != 500 and r.status_code in (400, 413, 429, 503), r.text
    if status is not None:
        assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "Traceback" not in r.text
    assert param_in in err["message"]


def raw(body: str) -> dict:
    return {"content": body.encode(), "headers": {"content-type": "application/json"}}


DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "1" + "0" * 400

# Bodies that reached a plain-text 500 (or worse) before: (name, request kwargs, word the error names)
BAD_BODIES = [
    ("deep array", raw(DEEP), "nested"),
    ("deep object", raw('{"a":' * 50_000 + "1" + "}" * 50_000), "nested"),
    ("deep in messages", raw('{"messages": ' + DEEP + "}"), "nested"),
    ("10**400 max_tokens", raw(json.dumps(chat())[:-1] + f', "max_completion_tokens": {HUGE_INT}}}'), "max_completion"),
    ("10**400 temperature", raw(json.dumps(chat())[:-1] + f', "temperature": {HUGE_INT}}}'), "temperature"),
    ("10**400 seed", raw(json.dumps(chat())[:-1] + f', "seed": {HUGE_INT}}}'), "seed"),
    ("-10**400 top_p", raw(json.dumps(chat())[:-1] + f', "top_p": -{HUGE_INT}}}'), "top_p"),
    ("1e400 temperature", raw(json.dumps(chat())[:-1] + ', "temperature": 1e400}'), "temperature"),
    ("stream_options list", {"json": chat(stream=True, stream_options=[1])}, "stream_options"),
    ("stream_options string", {"json": chat(stream_options="yes")}, "stream_options"),
    ("stream_options number", {"json": chat(stream_options=3)}, "stream_options"),
    ("include_usage string", {"json": chat(stream=True, stream_options={"include_usage": "no"})}, "stream_options"),
    ("include_usage list", {"json": chat(stream_options={"include_usage": []})}, "stream_options"),
    ("text part a number", {"json": chat(text=5)}, "text"),
    ("text part an object", {"json": chat(text={"a": 1})}, "text"),
    ("text part null", {"json": chat(text=None)}, "text"),
    ("not UTF-8", {"content": b'{"messages": "\xff\xfe"}', "headers": {"content-type": "application/json"}}, "JSON"),
    ("lone surrogate", raw('{"messages": [{"role": "user", "content": "\\ud800"}]}'), "image"),
    ("NaN seed", raw(json.dumps(chat())[:-1] + ', "seed": NaN}'), "seed"),
    ("Infinity max_tokens", raw(json.dumps(chat())[:-1] + ', "max_tokens": Infinity}'), "max_tokens"),
    ("empty body", raw(""), "JSON"),
    ("a string body", raw('"caption"'), "object"),
    ("null body", raw("null"), "object"),
    ("array body", raw("[1, 2]"), "object"),
    ("messages an object", {"json": {"messages": {"role": "user"}}}, "messages"),
    ("content a number", {"json": {"messages": [{"role": "user", "content": 7}]}}, "content"),
    ("image_url a list", {"json": {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                                "image_url": [PNG]}]}]}}, "image_url"),
    ("url a number", {"json": chat(url=12)}, "image_url.url"),
    ("n a list", {"json": chat(n=[1])}, "n must be 1"),
    ("stream a string", {"json": chat(stream="true")}, "stream"),
    ("max_tokens a bool", {"json": chat(max_tokens=True)}, "max_tokens"),
    ("max_tokens 2.5", {"json": chat(max_tokens=2.5)}, "max_tokens"),
    ("huge text", {"json": chat(text="x" * 200_000)}, "task"),
    ("media type svg", {"json": chat(url="data:image/svg+xml;base64,PHN2Zz4=")}, "data URI"),
    ("no base64 marker", {"json": chat(url="data:image/png," + PNG.split(",")[1])}, "data URI"),
    ("truncated png", {"json": chat(url=PNG[:60])}, "image"),
]


@pytest.mark.parametrize("name, request_kwargs, named", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_get_openai_shaped_400s(served, name, request_kwargs, named):
    client, _ = served
    r = client.post(URL, **request_kwargs)
    assert_openai_error(r, 400)
    assert named.lower() in r.json()["error"]["message"].lower(), r.text


def test_body_over_the_limit_is_413_before_parsing(served, monkeypatch):
    """Refused from the declared length, and from the streamed length when none is declared: the
    bodies are not JSON at all, so a 413 (not a 400) shows nothing was parsed."""
    client, _ = served
    monkeypatch.setattr(openai_api, "MAX_BODY_BYTES", 100_000)
    garbage = b"{" * 150_000
    declared = client.post(URL, content=garbage, headers={"content-type": "application/json"})
    assert_openai_error(declared, 413)
    streamed = client.post(URL, content=iter([garbage[:60_000]] * 3), headers={"content-type": "application/json"})
    assert "content-length" not in streamed.request.headers
    assert_openai_error(streamed, 413)
    under = client.post(URL, json=chat())  # and a body under the limit is served
    assert under.status_code == 200, under.text


def test_default_body_limit_fits_the_largest_image_and_no_more():
    assert openai_api.MAX_BODY_BYTES >= openai_api.MAX_IMAGE_BYTES * 4 // 3
    assert openai_api.MAX_BODY_BYTES < 2 * openai_api.MAX_IMAGE_BYTES


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**500), max_value=10**500) | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
FIELDS = ("messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stream",
          "stream_options", "n", "model")


@st.composite
def mutated_bodies(draw) -> dict:
    """A valid request with some fields replaced by arbitrary JSON, or parts of its message so."""
    body = chat()
    if draw(st.booleans()):  # one part of the message first, while it still has its shape
        part = draw(st.sampled_from(["text", "image_url", "type", "url", "content", "role"]))
        value = draw(json_values)
        msg = body["messages"][0]
        if part in ("content", "role"):
            msg[part] = value
        elif part == "url":
            msg["content"][1]["image_url"]["url"] = value
        else:
            msg["content"][0 if part == "text" else 1][part] = value
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        body[key] = draw(json_values)
    return body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=mutated_bodies())
def test_any_json_body_is_a_caption_or_an_openai_error(served, body):
    client, _ = served
    content = json.dumps(body, allow_nan=True)  # NaN and Infinity too, as some clients send them
    r = client.post(URL, content=content, headers={"content-type": "application/json"})
    if r.status_code == 200:
        if body.get("stream") is True:
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
        else:
            choice = r.json()["choices"][0]
            assert isinstance(choice["message"]["content"], str) and 0 <= choice["confidence"] <= 1
    else:
        assert_openai_error(r)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_any_bytes_as_a_body_or_as_an_image_are_refused_cleanly(served, data):
    client, _ = served
    assert_openai_error(client.post(URL, content=data, headers={"content-type": "application/json"}), 400)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert_openai_error(client.post(URL, json=chat(url=url)), 400)


def test_flood_past_the_queue_is_429_and_other_routes_stay_fast(cap):
    """300 requests at an engine that admits none: 200 wait (holding no thread), 100 are refused
    at once, `GET /v1/models` answers in well under a second, and closing the engine answers
    every waiting one with a 503."""
    engine = Engine(cap, max_batch=2, max_queue=200, max_new_tokens=8)
    engine._take = lambda block: (time.sleep(0.01), [])[1]  # a stalled engine: nothing is admitted
    statuses = []
    with api_server(engine) as url:

        async def flood():
            async def one(client):
                statuses.append((await client.post(URL, json=chat())).status_code)

            limits = httpx.Limits(max_connections=400)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
                await asyncio.gather(*(one(client) for _ in range(300)))

        flooding = threading.Thread(target=lambda: asyncio.run(flood()))
        flooding.start()
        deadline = time.monotonic() + 30
        while (engine.waiting.qsize() < 200 or statuses.count(429) < 100) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.waiting.qsize() == 200, "the waiting requests never all reached the queue"
        t0 = time.perf_counter()
        models = httpx.get(url + "/v1/models", timeout=30)
        took = time.perf_counter() - t0
        engine.close()
        flooding.join(60)
    assert models.status_code == 200 and took < 1.0, took
    assert sorted(set(statuses)) == [429, 503] and statuses.count(429) == 100 and statuses.count(503) == 200


def _captured_requests(engine, monkeypatch) -> list:
    taken = []
    submit = engine.submit

    def recording(*a, **k):
        taken.append(submit(*a, **k))
        return taken[-1]

    monkeypatch.setattr(engine, "submit", recording)
    monkeypatch.setattr(engine, "_take", lambda block: (time.sleep(0.01), [])[1])  # nothing finishes meanwhile
    return taken


def hang_up_cancels(engine, port: int, body: dict, monkeypatch) -> None:
    """Send `body` to the route on `port`, hang up once the engine has the request, and check
    that the request is cancelled."""
    taken = _captured_requests(engine, monkeypatch)
    body = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 20
        while not taken and time.monotonic() < deadline:
            time.sleep(0.02)
        assert taken and not taken[0].cancelled
    deadline = time.monotonic() + 5  # the socket is closed: the handler must notice and cancel
    while not taken[0].cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert taken[0].cancelled


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_cancels_its_request(served, monkeypatch, stream):
    client, engine = served
    port = int(str(client.base_url).rsplit(":", 1)[1].rstrip("/"))
    hang_up_cancels(engine, port, chat(max_tokens=200, stream=stream), monkeypatch)


@pytest.mark.parametrize("argv, named", [
    (["--max-batch", "0"], "--max-batch"), (["--max-batch", "-4"], "--max-batch"),
    (["--max-queue", "0"], "--max-queue"), (["--max-queue", "-1"], "--max-queue"),
    (["--port", "70000"], "--port"), (["--port", "-1"], "--port"), (["--port", "0"], "--port"),
])
def test_impossible_server_options_stop_start_up(argv, named, capsys, monkeypatch):
    monkeypatch.setattr(app, "load_captioner", lambda *a: pytest.fail("the model loaded before the options"))
    assert app.main(argv) == 2
    assert named in capsys.readouterr().err


def test_a_taken_port_is_a_named_error(tiny_app_checkpoint, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert app.main(["--checkpoint", str(tiny_app_checkpoint), "--port", str(port), "--device", "cpu"]) == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("options", [dict(max_batch=0), dict(max_queue=0), dict(max_batch=-1),
                                     dict(max_new_tokens=0), dict(max_batch=2.5), dict(max_queue=True)])
def test_engine_refuses_sizes_that_cannot_serve(cap, options):
    with pytest.raises(ValueError, match=next(iter(options))):
        Engine(cap, **options)


class Stop(BaseException):
    """Not an Exception: what the loop's per-iteration handler does not catch."""


@pytest.mark.parametrize("kind", [Stop, KeyboardInterrupt, SystemExit])
def test_the_engine_dying_fails_every_request_and_every_later_submit(cap, kind):
    engine = Engine(cap, max_batch=2, max_queue=8, max_new_tokens=8)
    step = engine._step

    def dying_step():
        step()
        raise kind("the loop is gone")

    engine._step = dying_step
    image = Image.new("RGB", (16, 16), "red")
    reqs = [engine.submit(image, max_new_tokens=8) for _ in range(5)]  # running and queued ones
    for req in reqs:
        with pytest.raises(BaseException) as e:  # it ends (no queue.Empty from the timeout), with a reason
            req.result(timeout=20)
        assert isinstance(e.value, EngineClosed) and kind.__name__ in str(e.value), e.value
    with pytest.raises(EngineClosed, match=f"stopped.*{kind.__name__}"):
        engine.submit(image, max_new_tokens=8)
    engine._thread.join(5)
    assert not engine._thread.is_alive()


# --- the page's handlers, called as Gradio calls them ------------------------------------------------

PAGE_OPTIONS = dict(mode="greedy", num_beams=4, temperature=0.7, top_p=1.0, max_new_tokens=2,
                    repetition_penalty=1.0, speculative=False, seed=-1)
BAD_PAGE_CALLS = [
    ("no image", None, {}), ("a folder", "/", {}), ("a missing file", "/nonexistent/x.png", {}),
    ("a text file", __file__, {}), ("an unknown task", "IMAGE", {"task": "poem"}),
    ("a task of another type", "IMAGE", {"task": 3}), ("mode unknown", "IMAGE", {"mode": "wild"}),
    ("zero tokens", "IMAGE", {"max_new_tokens": 0}), ("fractional tokens", "IMAGE", {"max_new_tokens": 2.5}),
    ("too many tokens", "IMAGE", {"max_new_tokens": 10**6}), ("no tokens", "IMAGE", {"max_new_tokens": None}),
    ("over the server's cap", "IMAGE", {"max_new_tokens": 300}),
    ("one beam", "IMAGE", {"mode": "beam search", "num_beams": 1}),
    ("fractional beams", "IMAGE", {"mode": "beam search", "num_beams": 2.5}),
    ("zero temperature sampling", "IMAGE", {"mode": "sampling", "temperature": 0}),
    ("negative temperature", "IMAGE", {"mode": "sampling", "temperature": -1}),
    ("NaN repetition penalty", "IMAGE", {"repetition_penalty": math.nan}),
    ("negative repetition penalty", "IMAGE", {"repetition_penalty": -2.0}),
    ("NaN top_p", "IMAGE", {"mode": "sampling", "top_p": math.nan}),
    ("top_p above 1", "IMAGE", {"mode": "sampling", "top_p": 7.0}),
]


@pytest.fixture(scope="module")
def shell(cap, served, tmp_path_factory):
    image = tmp_path_factory.mktemp("page") / "scene.png"
    Image.new("RGB", (24, 24), "blue").save(image)
    return app.Shell(cap, served[1]), str(image)


@pytest.mark.parametrize("name, image, changes", BAD_PAGE_CALLS, ids=[c[0] for c in BAD_PAGE_CALLS])
def test_page_handlers_answer_bad_input_with_a_message(shell, name, image, changes):
    handlers, path = shell
    kwargs = {"task": "caption", **PAGE_OPTIONS, **changes}
    task = kwargs.pop("task")
    image = path if image == "IMAGE" else image
    with pytest.raises(gr.Error) as e:
        asyncio.run(handlers.caption(image, task, **kwargs))
    assert e.value.message and "Traceback" not in e.value.message

    async def whole_stream():
        return [out async for out in handlers.stream(image, task, *kwargs.values())]

    with pytest.raises(gr.Error):
        asyncio.run(whole_stream())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(["greedy", "beam search", "sampling"]), beams=st.integers(-3, 20) | st.floats(),
       temperature=st.floats(), top_p=st.floats(), tokens=st.integers(-5, 300) | st.floats(),
       penalty=st.floats(), seed=st.integers(-10, 10**30) | st.floats(allow_nan=False))
def test_any_page_options_caption_or_give_a_message(shell, mode, beams, temperature, top_p, tokens, penalty, seed):
    handlers, path = shell
    try:
        text = asyncio.run(handlers.caption(path, "caption", mode, beams, temperature, top_p, tokens, penalty,
                                            False, seed))
    except gr.Error as e:
        assert e.message
    else:
        assert isinstance(text, str)


# --- one statement of the option limits, one mapping of errors ----------------------------------

def test_route_takes_the_temperatures_generation_config_takes(served, cap):
    """GenerationConfig samples at any temperature in 0..100; the route once stopped at 2."""
    client, _ = served
    r = client.post(URL, json=chat(temperature=3.0, seed=5))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == cap.caption(
        Image.new("RGB", (16, 16), "red"), max_new_tokens=2, temperature=3.0, seed=5)
    over = client.post(URL, json=chat(temperature=100.5))
    assert_openai_error(over, 400)
    assert over.json()["error"]["param"] == "temperature" and "0..100" in over.json()["error"]["message"]


def test_route_takes_the_seeds_generation_config_takes(served):
    """Seeds are 0..2**64-1 everywhere: a negative one is a 400 naming `seed` (the route once
    passed it on, to fail unnamed in the engine), the largest is served (the route once stopped at 2**63)."""
    client, _ = served
    negative = client.post(URL, json=chat(seed=-5))
    assert_openai_error(negative, 400)
    assert negative.json()["error"]["param"] == "seed" and "0..2**64-1" in negative.json()["error"]["message"]
    assert client.post(URL, json=chat(seed=2**64 - 1, temperature=1.0)).status_code == 200


def test_top_p_zero_is_refused_not_turned_into_one(served):
    client, _ = served
    r = client.post(URL, json=chat(top_p=0, temperature=1.0))
    assert_openai_error(r, 400)
    assert r.json()["error"]["param"] == "top_p" and "top_p" in r.json()["error"]["message"]


REQUEST_OPTIONS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                   "temperature": "temperature", "top_p": "top_p", "seed": "seed"}


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(sorted(REQUEST_OPTIONS)),
       value=st.integers(-3, 5) | st.integers(4090, 4100) | st.sampled_from([2**64 - 1, 2**64, -(2**63), 2**63])
       | st.floats(-1, 101) | st.sampled_from([0.0, 1.0, 100.0, 100.00001, math.nan, math.inf, 1e-300, True, "1"]))
def test_the_request_model_refuses_exactly_what_generation_config_refuses(field, value):
    """The request model's bounds are read from GenerationConfig.LIMITS: for every decoding field
    and value, the one accepts it if and only if the other does, and a refusal names the field."""
    from pydantic import ValidationError

    from lm import ConfigError
    from mm.generate import GenerationConfig
    from mm.protocol import ChatCompletionRequest, problem

    body = chat()
    del body["max_tokens"]
    body[field] = value
    try:
        GenerationConfig(**{REQUEST_OPTIONS[field]: value}).validate()
        config_takes = True
    except ConfigError:
        config_takes = False
    try:
        ChatCompletionRequest.model_validate(body)
        route_takes = True
    except ValidationError as e:
        route_takes = False
        refusal = problem(e)
        assert (refusal.status, refusal.param) == (400, field) and refusal.message.startswith(field), refusal
    assert route_takes == config_takes, (field, value)


def test_one_error_mapping_for_the_route_and_the_page(served, shell, monkeypatch):
    """The same engine refusal reads the same on the page as in the route's JSON."""
    from lm import ConfigError
    from mm.engine import Cancelled, EngineBusy
    from mm.protocol import problem
    from vision.preprocess import ImageError

    client, engine = served
    handlers, path = shell
    expected = {EngineBusy("busy: 3 requests are already waiting"): (429, "server_busy"),
                EngineClosed("the engine has stopped"): (503, "server_error"),
                ConfigError("top_k must be >= 0, got -1"): (400, "invalid_request_error"),
                ImageError("x.png is not a readable image"): (400, "invalid_request_error")}
    for exc, (status, kind) in expected.items():
        def refuse(*a, exc=exc, **k):
            raise exc

        monkeypatch.setattr(engine, "submit", refuse)
        r = client.post(URL, json=chat())
        assert (r.status_code, r.json()["error"]["type"]) == (status, kind), r.text
        with pytest.raises(gr.Error) as page:
            asyncio.run(handlers.caption(path, "caption", **PAGE_OPTIONS))
        assert r.json()["error"]["message"] == html.unescape(page.value.message) == problem(exc).message
    # once the engine has a request, only a stop or a cancel is not the server's own failure
    assert problem(ValueError("bad shape"), submitting=False).status == 500
    assert problem(Cancelled("cancelled"), submitting=False).status == 503


@pytest.mark.parametrize("changes, named", [
    ({"mode": "sampling", "seed": -5}, "seed"), ({"mode": "sampling", "top_p": 0.0}, "top_p"),
    ({"mode": "sampling", "temperature": 101.0}, "temperature"), ({"mode": "beam search", "num_beams": 17}, "num_beams"),
])
def test_page_options_are_checked_by_generation_config(changes, named):
    """A negative seed other than the page's -1 (random) was once silently random."""
    with pytest.raises(gr.Error, match=named):
        app.decoding_options(**{**PAGE_OPTIONS, **changes})


def test_sliders_stay_inside_generation_configs_limits():
    assert app.slider_range("top_p", 0.05, 1.0) == (0.05, 1.0)
    for option, lo, hi in (("top_p", 0.0, 1.0), ("num_beams", 2, 20), ("temperature", 0.05, 200.0)):
        with pytest.raises(ValueError, match=option):
            app.slider_range(option, lo, hi)
