"""The Gradio app through gradio_client, and its handlers called directly.

Plumbing (API shape, bad input, streaming, batch, load) runs on a randomly
initialised tiny checkpoint launched once for the module; whatever text it
produces, the app must return exactly what `Captioner` returns for the same
image and options. The bundled default model must give the exact caption of a
scene through the API, in every task.
"""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import io
import json
import socket
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
from mm.captioner import Captioner
from train.data.scenes import Scene, SceneObject, render, sample_rng, sample_scene, texts

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("caption", "describe", "caption_zh", "describe_zh")
FEW = 6  # max_new_tokens for the random model: its text is noise, its length only costs time
AS_APP = dict(max_new_tokens=FEW, speculative=True)  # the app's defaults, with few tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(cap: Captioner, untrained: bool):
    demo, engine, url = app.serve(cap, untrained, port=free_port(), block=False, quiet=True)
    return demo, engine, url


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: the shape of a decompression bomb, a few bytes long."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR payload follows signature + length + type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def centre_scene() -> Scene:
    return Scene("white", [SceneObject(cell=4, shape="circle", colour="red", size="large", side=32, x=64, y=64)])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("inputs")
    scene = render(sample_scene(sample_rng("test", 0, 7)))
    paths = {"scene": d / "scene.png", "grey": d / "grey.png", "rgba": d / "rgba.png", "text": d / "notes.txt",
             "broken": d / "broken.png", "bomb": d / "bomb.png", "huge": d / "huge.png",
             "huge13000": d / "huge13000.png"}
    scene.save(paths["scene"])
    scene.convert("L").save(paths["grey"])
    rgba = scene.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(scene.size))  # half-transparent: composited on white
    rgba.save(paths["rgba"])
    paths["text"].write_text("not an image")
    paths["broken"].write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    paths["bomb"].write_bytes(png_header(20000, 20000))  # over PIL's own bomb guard
    paths["huge"].write_bytes(png_header(9000, 8000))  # under PIL's guard, over the app's pixel cap
    # decoded, this header would fail as truncated: "over the limit" shows the header was read first
    paths["huge13000"].write_bytes(png_header(13000, 13000))
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def tiny(tiny_app_checkpoint):
    """A random tiny checkpoint loaded back and served on a free port: (captioner, client)."""
    cap = Captioner.from_pretrained(tiny_app_checkpoint, device="cpu")
    demo, engine, url = serve(cap, untrained=True)
    yield cap, Client(url, verbose=False), url, engine
    demo.close()
    engine.close()


def test_caption_endpoint_returns_the_captioners_text_for_every_task(tiny, files):
    cap, client, *_ = tiny
    for task in TASKS:
        got = client.predict(handle_file(files["scene"]), task=task, max_new_tokens=FEW, api_name="/caption")
        assert got == cap.caption(files["scene"], task=task, **AS_APP), task


def test_caption_endpoint_options_have_defaults(tiny):
    params = tiny[1].view_api(return_format="dict", print_info=False)["named_endpoints"]["/caption"]["parameters"]
    defaults = {p["parameter_name"]: p.get("parameter_default") for p in params}
    assert list(defaults)[:2] == ["image", "task"]
    assert defaults["task"] == "caption" and defaults["mode"] == "greedy" and defaults["max_new_tokens"] == 64


def test_decoding_modes_reach_the_captioner(tiny, files):
    cap, client, *_ = tiny
    beam = client.predict(handle_file(files["scene"]), mode="beam search", num_beams=3, max_new_tokens=FEW,
                          api_name="/caption")
    assert beam == cap.caption(files["scene"], num_beams=3, max_new_tokens=FEW)
    kw = dict(temperature=1.5, top_p=0.9, max_new_tokens=FEW, repetition_penalty=1.3)
    sampled = client.predict(handle_file(files["scene"]), mode="sampling", seed=11, api_name="/caption", **kw)
    assert sampled == cap.caption(files["scene"], seed=11, **kw)


def test_grey_and_transparent_images_work(tiny, files):
    cap, client, *_ = tiny
    rgba = Image.open(files["rgba"])
    on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    expected = {"grey": Image.open(files["grey"]).convert("RGB"), "rgba": on_white}
    for name, reference in expected.items():
        got = client.predict(handle_file(files[name]), max_new_tokens=FEW, api_name="/caption")
        assert got == cap.caption(reference, **AS_APP), name


@pytest.mark.parametrize("name, kwargs, message", [
    ("no image", {"image": None}, "No image"),
    ("text file", {"image": "text"}, "notes.txt is not a readable image"),
    ("broken png", {"image": "broken"}, "is not a readable image"),
    ("bomb over PIL's guard", {"image": "bomb"}, "too large to open safely"),
    ("huge under PIL's guard", {"image": "huge"}, "over the limit of"),
    ("13000 x 13000, refused from its header", {"image": "huge13000"}, "over the limit of"),
    ("too many tokens", {"max_new_tokens": 1000}, "Max new tokens"),
    ("zero tokens", {"max_new_tokens": 0}, "Max new tokens"),
    ("beams without beams", {"mode": "beam search", "num_beams": 1}, "Beams"),
    ("unknown task", {"task": "poem"}, "poem"),
])
def test_bad_input_is_a_message_and_the_app_keeps_serving(tiny, files, name, kwargs, message):
    cap, client, *_ = tiny
    kwargs = {"image": "scene", **kwargs}
    kwargs["image"] = handle_file(files[kwargs["image"]]) if kwargs["image"] else None
    with pytest.raises(AppError) as err:
        client.predict(api_name="/caption", **kwargs)
    assert message in str(err.value) and "Traceback" not in str(err.value) and "/tmp/" not in str(err.value)
    assert client.predict(handle_file(files["scene"]), max_new_tokens=FEW, api_name="/caption") == \
        cap.caption(files["scene"], **AS_APP)


def test_stream_ends_with_the_full_text_stats_and_routing(tiny, files):
    cap, client, *_ = tiny
    job = client.submit(handle_file(files["scene"]), "describe", "greedy", 4, 0.7, 1.0, 12, 1.0, False, None,
                        api_name="/caption_stream")
    text, stats, plot = job.result()
    expected = cap.caption(files["scene"], task="describe", max_new_tokens=12, speculative=False)
    # A stream cut by max_new_tokens holds back an unfinished UTF-8 character (U+FFFD) at its end.
    assert text.rstrip("\ufffd") == expected.rstrip("\ufffd")
    assert "tokens/s" in stats and "latency" in stats
    assert plot is not None and "matplotlib" in json.dumps(plot)
    partial = [out[0] for out in job.outputs()]
    assert all(text.startswith(p) for p in partial)  # each update extends the text shown before


async def last_output(stream):
    outs = [out async for out in stream]
    return outs[-1] if outs else None


def test_simultaneous_streams_on_one_loop_match_lone_runs(tiny, files):
    """The page's handlers wait on Gradio's event loop: six streams at once, which the engine
    decodes in the same batch, each give their own text and routing counts."""
    shell = app.Shell(tiny[0], tiny[3])
    args = ("caption", "greedy", 4, 0.7, 1.0, 12, 1.0, False, -1)
    names = ("scene", "grey", "rgba", "scene", "grey", "rgba")
    alone = [asyncio.run(last_output(shell.stream(files[name], *args))) for name in names[:3]] * 2

    async def together():
        streams = [shell.stream(files[name], *args) for name in names]
        firsts = await asyncio.gather(*(anext(s) for s in streams))  # all six started, all waiting
        rest = await asyncio.gather(*(last_output(s) for s in streams))
        return [r if r is not None else f for r, f in zip(rest, firsts)]

    for got, want in zip(asyncio.run(together()), alone, strict=True):
        assert got[0] == want[0]
        routing = [out[2].axes[0].images[0].get_array() for out in (got, want)]
        assert (routing[0] == routing[1]).all()  # each stream's routing view counts only its own tokens


def test_batch_tab_captions_each_file_and_reports_broken_ones(tiny, files):
    cap, client, *_ = tiny
    inputs = [files["scene"], files["broken"], files["grey"]]
    table, summary, csv_path, jsonl_path = client.predict(
        [handle_file(f) for f in inputs], "caption_zh", "greedy", 4, 0.7, 1.0, FEW, 1.0, True, None,
        api_name="/caption_batch")
    rows = table["data"]
    assert [r[0] for r in rows] == ["scene.png", "broken.png", "grey.png"]
    assert rows[0][1] == cap.caption(files["scene"], task="caption_zh", **AS_APP)
    assert rows[1][1] == "" and "not a readable image" in rows[1][4]
    assert rows[0][2] == round(cap.run(files["scene"], task="caption_zh", **AS_APP).confidence[0], 4)
    assert rows[0][3] is cap.unfamiliar(rows[0][2], "caption_zh") is False
    assert "2 of 3" in summary
    with open(csv_path, encoding="utf-8") as f:
        from_csv = list(csv.DictReader(f))
    from_jsonl = [json.loads(line) for line in Path(jsonl_path).read_text(encoding="utf-8").splitlines()]
    for rec in (from_csv, from_jsonl):
        assert [(r["file"], r["caption"], r["error"]) for r in rec] == [(r[0], r[1], r[4]) for r in rows]
        assert float(rec[0]["confidence"]) == rows[0][2]
        assert {r["task"] for r in rec} == {"caption_zh"}
    with pytest.raises(AppError, match="Invalid file type"):  # the file picker's type rule holds on the server
        client.predict([handle_file(files["text"])], "caption", api_name="/caption_batch")


def test_untrained_model_is_announced_on_the_page(tiny):
    import urllib.request

    with urllib.request.urlopen(tiny[2] + "config") as r:
        config = r.read().decode()
    assert "untrained" in config and "make default-model" in config


def test_missing_default_model_falls_back_to_random_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(app, "DEFAULT_MODEL_DIR", tmp_path / "nowhere")
    cap, untrained = app.load_captioner(None, "cpu")
    assert untrained and cap.tasks == list(TASKS)
    with pytest.raises(Exception, match="does not exist"):  # an explicit checkpoint must exist
        app.load_captioner(tmp_path / "nowhere", "cpu")


def test_decoding_options_map_and_reject():
    assert app.decoding_options("greedy", max_new_tokens=9) == dict(
        max_new_tokens=9, repetition_penalty=1.0, speculative=True, num_beams=1, temperature=0.0, top_p=1.0)
    assert app.decoding_options("beam search", num_beams=5)["num_beams"] == 5
    sampled = app.decoding_options("sampling", temperature=0.5, top_p=0.8, seed=3.0)
    assert (sampled["temperature"], sampled["top_p"], sampled["seed"], sampled["num_beams"]) == (0.5, 0.8, 3, 1)
    for bad in (dict(mode="nucleus"), dict(max_new_tokens=2.5), dict(max_new_tokens=None),
                dict(mode="sampling", temperature=0), dict(mode="beam search", num_beams=1)):
        with pytest.raises(gr.Error):
            app.decoding_options(**bad)


def test_routing_figure_has_a_row_per_moe_layer():
    fig = app.routing_figure([[3, 1, 0, 0], [0, 0, 2, 2], [1, 1, 1, 1]])
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (3, 4)
    assert abs(float(image.sum(1)[0]) - 1.0) < 1e-9 and float(image[0, 0]) == 0.75
    assert app.routing_figure([]) is None


def test_command_line_defaults_and_bad_checkpoint(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    app.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.checkpoint) == ("127.0.0.1", 7860, None)
    assert app.run(parser.parse_args(["--checkpoint", str(tmp_path / "missing")])) == 2
    assert "missing" in capsys.readouterr().err


def test_load_sixteen_clients_all_served_and_consistent(tiny, files):
    spec = importlib.util.spec_from_file_location("app_load", ROOT / "benchmarks" / "app_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    jobs = [(files[name], task) for name in ("scene", "grey") for task in ("caption", "describe_zh")]
    result = bench.run_load(tiny[2], jobs, clients=16, requests=4, max_new_tokens=3)
    assert result["requests"] == 64 and result["ok"] == 64 and result["correct"] == 64, result
    assert result["p50_s"] <= result["p95_s"]


@pytest.fixture(scope="module")
def trained():
    """The bundled default model served by the app, and the same model used directly."""
    cap = Captioner.from_pretrained(None, device="cpu")
    demo, engine, url = serve(cap, untrained=False)
    yield Client(url, verbose=False), cap
    demo.close()
    engine.close()


def test_default_model_through_the_api_in_every_task(trained, tmp_path):
    """The app returns the library's caption, and the bundled model's caption is exact."""
    client, cap = trained
    three = Scene("black", [
        SceneObject(cell=0, shape="triangle", colour="yellow", size="large", side=30, x=22, y=20),
        SceneObject(cell=5, shape="diamond", colour="blue", size="small", side=14, x=105, y=62),
        SceneObject(cell=7, shape="square", colour="purple", size="large", side=32, x=66, y=108),
    ])
    for i, scene in enumerate([centre_scene(), three]):
        path = tmp_path / f"scene{i}.png"
        render(scene).save(path)
        for task in TASKS:
            got = client.predict(handle_file(str(path)), task=task, api_name="/caption")
            assert got == cap.caption(str(path), task=task)
            assert got == texts(scene)[task], (task, got)


# --- the OpenAI-compatible API, driven by the official client -------------------------------

def data_url(path_or_bytes, media="image/png") -> str:
    import base64

    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return f"data:{media};base64," + base64.b64encode(data).decode()


def chat(text, url, **extra):
    parts = ([{"type": "text", "text": text}] if text is not None else []) + \
        ([{"type": "image_url", "image_url": {"url": url}}] if url is not None else [])
    return dict(model="any", messages=[{"role": "user", "content": parts}], **extra)


@pytest.fixture(scope="module")
def openai_client(tiny):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=tiny[2] + "v1", api_key="unused", max_retries=0)


def test_openai_chat_completion_equals_the_captioner(tiny, files, openai_client):
    cap = tiny[0]
    for task, text in (("caption", None), ("describe", "describe"), ("caption_zh", "标题："), ("describe_zh", " describe_zh ")):
        r = openai_client.chat.completions.create(**chat(text, data_url(files["scene"]), max_tokens=FEW))
        assert r.choices[0].message.content == cap.caption(files["scene"], task=task, max_new_tokens=FEW), task
        assert r.choices[0].finish_reason in ("stop", "length") and r.object == "chat.completion"
        judged = cap.run(files["scene"], task=task, max_new_tokens=FEW)
        assert r.choices[0].model_extra == {"confidence": round(judged.confidence[0], 4),
                                            "unfamiliar": judged.unfamiliar[0]}
        prompt = len(cap.tokenizer.build_prompt(cap.model.cfg.tasks[task], cap.model.num_image_tokens))
        assert (r.usage.prompt_tokens, r.usage.total_tokens) == (prompt, prompt + r.usage.completion_tokens)
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [app.model_id(cap)]


def test_openai_stream_and_sampling(tiny, files, openai_client):
    cap = tiny[0]
    stream = openai_client.chat.completions.create(**chat("describe", data_url(files["grey"]), max_tokens=FEW,
                                                          stream=True, stream_options={"include_usage": True}))
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.rstrip("\ufffd") == cap.caption(files["grey"], task="describe", max_new_tokens=FEW).rstrip("\ufffd")
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens >= 1
    assert 0 <= chunks[-1].choices[0].model_extra["confidence"] <= 1
    sampled = openai_client.chat.completions.create(**chat("caption", data_url(files["scene"]), max_tokens=FEW,
                                                           temperature=1.2, top_p=0.9, seed=5))
    assert sampled.choices[0].message.content == cap.caption(files["scene"], max_new_tokens=FEW, temperature=1.2,
                                                             top_p=0.9, seed=5)


def test_openai_raw_stream_ends_with_done(tiny, files):
    import httpx

    body = chat("caption", data_url(files["scene"]), max_tokens=3, stream=True)
    with httpx.stream("POST", tiny[2] + "v1/chat/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("name, body, status, message", [
    ("remote url", chat("caption", "https://example.com/a.png"), 400, "fetches no remote URLs"),
    ("unknown task", "TASK:poem", 400, "caption ('Caption:')"),
    ("no image", chat("caption", None), 400, "exactly one image_url"),
    ("not base64", chat("caption", "data:image/png;base64,@@@"), 400, "not valid base64"),
    ("not an image", "BYTES:text", 400, "not a readable image"),
    ("pixel bomb", "BYTES:bomb13000", 400, "over the limit"),
    ("zero tokens", "OPTS:max_tokens=0", 400, "max_tokens"),
    ("nan temperature", "RAW:NaN", 400, "temperature"),
    ("two answers", "OPTS:n=2", 400, "n must be 1"),
    ("not json", "RAW:{", 400, "not valid JSON"),
    ("no messages", {"model": "m"}, 400, "messages"),
])
def test_openai_bad_requests_get_openai_errors(tiny, files, name, body, status, message):
    import httpx

    scene = data_url(files["scene"])
    content = None
    if body == "TASK:poem":
        body = chat("poem", scene)
    elif body == "BYTES:text":
        body = chat("caption", data_url(Path(files["text"]).read_bytes()))
    elif body == "BYTES:bomb13000":
        body = chat("caption", data_url(png_header(13000, 13000)))
    elif isinstance(body, str) and body.startswith("OPTS:"):
        key, value = body[5:].split("=")
        body = chat("caption", scene, **{key: int(value)})
    elif body == "RAW:NaN":
        content = json.dumps(chat("caption", scene))[:-1] + ', "temperature": NaN}'
    elif body == "RAW:{":
        content = "{"
    r = httpx.post(tiny[2] + "v1/chat/completions", timeout=60,
                   **({"content": content, "headers": {"content-type": "application/json"}} if content else
                      {"json": body}))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] and "Traceback" not in r.text


def test_eps_bytes_sent_as_png_never_reach_ghostscript(tiny, monkeypatch, tmp_path):
    import httpx
    from PIL import EpsImagePlugin

    from tests.test_injection import EPS

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    r = httpx.post(tiny[2] + "v1/chat/completions", json=chat("caption", data_url(EPS)), timeout=60)
    assert r.status_code == 400 and "supported format" in r.json()["error"]["message"], r.text
    upload = tmp_path / "upload.png"
    upload.write_bytes(EPS)
    with pytest.raises(AppError, match="readable image"):
        tiny[1].predict(handle_file(str(upload)), task="caption", api_name="/caption")
    assert calls == []


def test_openai_hang_up_through_the_page_server_cancels_the_request(tiny, files, monkeypatch):
    """The same check as tests/test_server_abuse.py's, on the app as served (Gradio's middleware
    in front of the route): a non-streaming client that leaves cancels its request."""
    from tests.test_server_abuse import hang_up_cancels

    engine, port = tiny[3], int(tiny[2].rstrip("/").rsplit(":", 1)[1])
    hang_up_cancels(engine, port, chat("caption", data_url(files["scene"]), max_tokens=200), monkeypatch)


def test_waiting_page_requests_hold_no_thread(tiny, files, monkeypatch):
    """With one worker thread for the whole page, eight captions are all in the engine before the
    first comes back: a handler waits for its result on the event loop, not on the thread (the
    thread only reads each upload)."""
    shell = app.Shell(tiny[0], tiny[3])
    events, submit, result = [], shell._submit, shell._result

    def logged_submit(*args):
        events.append("submit")
        return submit(*args)

    async def logged_result(req):
        out = await result(req)
        events.append("done")
        return out

    monkeypatch.setattr(shell, "_submit", logged_submit)
    monkeypatch.setattr(shell, "_result", logged_result)

    async def eight():
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))
        return await asyncio.gather(*(shell.caption(files["scene"], max_new_tokens=FEW) for _ in range(8)))

    texts = asyncio.run(eight())
    assert len(set(texts)) == 1 and texts[0] == tiny[0].caption(Image.open(files["scene"]), max_new_tokens=FEW)
    assert events[:8] == ["submit"] * 8 and events[8:] == ["done"] * 8


def test_a_user_who_leaves_while_the_upload_is_read_leaves_no_request(tiny, files, monkeypatch):
    """The handler is cancelled while its worker thread still reads the upload: the request
    that thread then submits is cancelled as soon as it exists, not decoded for nobody."""
    shell = app.Shell(tiny[0], tiny[3])
    reading, release, submitted = threading.Event(), threading.Event(), []
    open_and_submit = shell._open_and_submit

    def slow_open_and_submit(*args):
        reading.set()
        release.wait(10)
        submitted.append(open_and_submit(*args))
        return submitted[-1]

    monkeypatch.setattr(shell, "_open_and_submit", slow_open_and_submit)

    async def leave():
        task = asyncio.ensure_future(shell.caption(files["scene"], max_new_tokens=FEW))
        await asyncio.to_thread(reading.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        while not submitted:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the done-callback runs on the loop after the thread finishes

    asyncio.run(leave())
    assert submitted[0].cancelled


def test_batch_tables_never_hold_nan(tiny, files, monkeypatch):
    """A NaN confidence (a damaged model) is written as unknown, not as the invalid JSON `NaN`."""
    cap, engine = tiny[0], tiny[3]
    shell = app.Shell(cap, engine)
    result = type("R", (), {"text": "x", "stats": type("S", (), {"confidence": [float("nan")]})()})()
    async def aresult():
        return result

    req = type("Q", (), {"aresult": lambda self: aresult(), "cancel": lambda self: None})()
    monkeypatch.setattr(shell, "_submit", lambda *a: req)
    table, _, _, jsonl = asyncio.run(shell.batch([files["scene"]], "caption", "greedy", 4, 0.7, 1.0, FEW, 1.0,
                                                 False, -1))
    line = Path(jsonl).read_text(encoding="utf-8")
    assert "NaN" not in line and json.loads(line)["confidence"] is None and table[0][2:4] == [None, None]
