"""An OpenAI-compatible HTTP API over the engine: `GET /v1/models`, `POST /v1/chat/completions`.

The chat format is the one OpenAI's clients send: the last user message holds the image
as an `image_url` part with a `data:` URI (base64 PNG, JPEG or WebP; the server fetches
nothing, so a remote URL is a clear 400) and a text part naming the task or its prompt
(`caption`, `describe`, `Describe:`, ...; absent means `caption`). `max_tokens`,
`temperature` (default 0: greedy, what a captioner wants; OpenAI's own default is 1),
`top_p`, `seed` and `stream` (server-sent events in the chunk format, ending with
`data: [DONE]`) are honoured; `usage` counts the prompt (with its image tokens) and the
completion. Each choice also carries `confidence` (in [0, 1]) and `unfamiliar` (true when
the image looks unlike the model's training data: mm/confidence.py). Errors use OpenAI's
shape `{"error": {"message", "type", "param", "code"}}` with 400 for bad input (whatever
JSON it is), 413 for an oversized body (refused before it is parsed), 429 when the
engine's queue is full and 503 when it has stopped.

Waiting is asynchronous: a request waiting for its text holds no thread (the engine wakes
the event loop), so hundreds of queued requests leave the other routes answering at once.
A client that hangs up, streaming or not, cancels its request and frees its row.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from mm.engine import Cancelled, Engine, EngineBusy, EngineClosed
from vision.preprocess import ImageError, load_image

MAX_IMAGE_BYTES = 50 * 1024 * 1024  # as the Gradio page's upload limit
MAX_BODY_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 2**20  # that image in base64, and a megabyte for the rest
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": None}}, status_code=self.status)


def _image(url: str):
    """A data: URI -> PIL image, refusing anything else and oversized pictures before decoding."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise APIError(400, "image_url must be a data: URI (data:image/png;base64,...); this server fetches "
                            "no remote URLs", "messages")
    head, _, payload = url.partition(",")
    media = head[5:].split(";")[0].lower()
    if media not in IMAGE_TYPES or ";base64" not in head:
        raise APIError(400, f"image_url: expected a base64 data URI of {', '.join(IMAGE_TYPES)}, got "
                            f"{head[:40]!r}", "messages")
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
        raise APIError(413, f"image is over {MAX_IMAGE_BYTES // 2**20} MB", "messages")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image_url: the data URI is not valid base64", "messages") from None
    try:
        return load_image(data)  # refuses a pixel count over the cap from the header, before decoding
    except ImageError as e:
        raise APIError(400, f"image: {e}", "messages") from None


def _task(text: str | None, tasks: dict[str, str]) -> str:
    if text is None or not text.strip():
        return "caption"
    text = text.strip()
    for name, prompt in tasks.items():
        if text == name or text == prompt.strip():
            return name
    listed = ", ".join(f"{n} ({p!r})" for n, p in tasks.items())
    raise APIError(400, f"the text part must name a task or its prompt; got {text[:80]!r}. Tasks: {listed}",
                   "messages")


def _number(body: dict, key: str, lo: float, hi: float, default, integer: bool = False):
    v = body.get(key)
    if v is None:
        return default
    # ints compare exactly (10**400 has no float); floats must be finite
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or math.isfinite(v))
    ok = ok and lo <= v <= hi and not (integer and v != int(v))
    if not ok:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"{key} must be {kind} in [{lo}, {hi}], got {_short(v)}", key)
    return int(v) if integer else float(v)


def parse_request(body, tasks: dict[str, str], max_tokens: int) -> tuple:
    """A chat-completions body -> (image, task, decoding options, stream, include_usage)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise APIError(400, "messages need a user message holding the image", "messages")
    content = user[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise APIError(400, "a user message's content must be a string or a list of parts", "messages")
    images = [p.get("image_url") for p in parts if isinstance(p, dict) and p.get("type") == "image_url"]
    texts = [p.get("text") for p in parts if isinstance(p, dict) and p.get("type") == "text"]
    if not all(isinstance(t, str) for t in texts):
        raise APIError(400, "a text part's text must be a string", "messages")
    if len(images) != 1:
        raise APIError(400, f"send exactly one image_url part in the last user message (got {len(images)})",
                       "messages")
    url = images[0].get("url") if isinstance(images[0], dict) else images[0]
    if body.get("n", 1) != 1:
        raise APIError(400, "n must be 1", "n")
    options = {
        "max_new_tokens": _number(body, "max_completion_tokens", 1, max_tokens, None, integer=True)
        or _number(body, "max_tokens", 1, max_tokens, 64, integer=True),
        "temperature": _number(body, "temperature", 0, 2, 0.0),
        "top_p": _number(body, "top_p", 0, 1, 1.0) or 1.0,
    }
    seed = _number(body, "seed", -(2**63), 2**63 - 1, None, integer=True)
    if seed is not None:
        options["seed"] = seed
    if options["temperature"] == 0:
        options["top_p"] = 1.0
    task = _task(" ".join(texts) or None, tasks)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {_short(stream)}", "stream")
    stream_options = body.get("stream_options") or {}
    usage = stream_options.get("include_usage", False) if isinstance(stream_options, dict) else None
    if not isinstance(usage, bool):
        raise APIError(400, 'stream_options must be an object like {"include_usage": true}, got '
                            f"{_short(stream_options)}", "stream_options")
    return _image(url), task, options, stream, usage


def _short(value) -> str:
    """A client's value for a message: its repr, cut (it may be megabytes)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def router(engine: Engine, model_id: str, max_tokens: int = 256) -> APIRouter:
    api = APIRouter()
    created = int(time.time())
    tasks = dict(engine.model.cfg.tasks)

    @api.get("/v1/models")
    async def models():  # on the loop, never behind a queue of worker threads
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "mm"}]}

    def submit(raw: bytes):
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's depth
            raise APIError(400, "the request body is not valid JSON (or is nested too deeply)") from None
        image, task, options, stream, include_usage = parse_request(body, tasks, max_tokens)
        return engine.submit(image, task, **options), task, stream, include_usage

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        # Parsing, decoding the image and preprocessing run on a worker thread, briefly; the
        # wait for the text is awaited on the loop, so no thread is held per waiting request.
        try:
            raw = await _body(request)
            req, task, stream, include_usage = await run_in_threadpool(submit, raw)
        except APIError as e:
            return e.response()
        except ClientDisconnect:  # gone while sending the body: nobody to answer
            return Response(status_code=499)
        except EngineBusy as e:
            return APIError(429, str(e), kind="server_busy").response()
        except EngineClosed as e:
            return APIError(503, str(e), kind="server_error").response()
        except (ValueError, TypeError, ImageError) as e:
            return APIError(400, str(e)).response()
        prompt_tokens = len(engine.prefix[task])
        cid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if stream:
            return StreamingResponse(_events(req, cid, now, model_id, prompt_tokens, include_usage, engine, task),
                                     media_type="text/event-stream")
        try:
            res = await _result_unless_gone(req, request)
        except (EngineClosed, Cancelled) as e:
            return APIError(503, f"captioning stopped: {e}", kind="server_error").response()
        except Exception as e:  # a failed forward; the server keeps serving
            return APIError(500, f"captioning failed: {e}", kind="server_error").response()
        if res is None:  # the client hung up; nobody reads this
            return Response(status_code=499)
        return {"id": cid, "object": "chat.completion", "created": now, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                             "finish_reason": _finish(res, engine.tok.eos_id), **_judgement(res, engine, task)}],
                "usage": _usage(prompt_tokens, res)}

    return api


async def _body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it is known to be over MAX_BODY_BYTES: from its
    declared length before a byte is read, else while it streams in."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {int(declared)} bytes, over the limit of {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _hung_up(request: Request) -> None:
    """Returns when the client disconnects. Once the body is read, the server's `receive`
    has nothing else to say, so it waits for exactly that."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.1)  # a server that repeats body messages must not spin the loop


async def _result_unless_gone(req, request: Request):
    """The request's result, or None when the client hung up first (the request is then
    cancelled and its row freed)."""
    result = asyncio.ensure_future(req.aresult())
    gone = asyncio.ensure_future(_hung_up(request))
    try:
        await asyncio.wait((result, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():  # the client left, or this handler was cancelled
            req.cancel()
            result.cancel()
    return result.result() if result.done() and not result.cancelled() else None


def _finish(res, eos_id: int) -> str:
    return "stop" if res.tokens and res.tokens[-1] == eos_id else "length"


def judgement(conf: float, cap, task: str) -> dict:
    """{"confidence", "unfamiliar"} as the API and the page's tables report them: both None when
    the confidence is not a number (JSON has no NaN, and no flag may rest on one)."""
    if not math.isfinite(conf):
        return {"confidence": None, "unfamiliar": None}
    return {"confidence": round(conf, 4), "unfamiliar": cap.unfamiliar(conf, task)}


def _judgement(res, engine: Engine, task: str) -> dict:
    return judgement(res.stats.confidence[0], engine.cap, task)


def _usage(prompt_tokens: int, res) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": len(res.tokens),
            "total_tokens": prompt_tokens + len(res.tokens)}


async def _events(req, cid: str, created: int, model_id: str, prompt_tokens: int, include_usage: bool,
                  engine: Engine, task: str):
    """Server-sent events in the chunk format; a client that goes away cancels the request."""

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, extra: dict | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **(extra or {})}]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in req.astream():
            yield chunk({"content": piece})
        res = await req.aresult()
        yield chunk({}, _finish(res, engine.tok.eos_id), _usage(prompt_tokens, res) if include_usage else None,
                    _judgement(res, engine, task))
    except Exception as e:
        err = {"error": {"message": f"captioning failed: {e}", "type": "server_error", "param": None, "code": None}}
        yield f"data: {json.dumps(err)}\n\n"
    finally:
        req.cancel()  # no-op once finished; frees the row of a client that disconnected
    yield "data: [DONE]\n\n"
