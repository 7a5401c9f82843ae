"""An OpenAI-compatible HTTP API over the engine: `GET /v1/models`, `POST /v1/chat/completions`.

The chat format is the one OpenAI's clients send: the last user message holds the image
as an `image_url` part with a `data:` URI (base64 PNG, JPEG or WebP; the server fetches
nothing, so a remote URL is a clear 400) and a text part naming the task or its prompt
(`caption`, `describe`, `Describe:`, ...; absent means `caption`). `max_tokens`,
`temperature` (default 0: greedy, what a captioner wants; OpenAI's own default is 1),
`top_p`, `seed` and `stream` (server-sent events in the chunk format, ending with
`data: [DONE]`) are honoured, in the ranges `GenerationConfig` states; `usage` counts the
prompt (with its image tokens) and the completion. Each choice also carries `confidence`
(in [0, 1]) and `unfamiliar` (true when the image looks unlike the model's training data:
mm/confidence.py). Errors use OpenAI's shape `{"error": {"message", "type", "param",
"code"}}` with 400 for bad input (whatever JSON it is; the message and `param` name the
field), 413 for an oversized body (refused before it is parsed), 429 when the engine's
queue is full and 503 when it has stopped (mm.protocol.problem, shared with the page).

Waiting is asynchronous: a request waiting for its text holds no thread (the engine wakes
the event loop), so hundreds of queued requests leave the other routes answering at once.
A client that hangs up, streaming or not, cancels its request and frees its row.

The request and response are the declared models of mm/protocol.py; the body is read here (to
refuse an oversized one before parsing) and validated against `ChatCompletionRequest`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import time
import uuid
from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from mm.confidence import reported
from mm.engine import Engine
from mm.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Problem,
    RequestError,
    Usage,
    problem,
)
from vision.preprocess import ImageError, load_image

MAX_IMAGE_BYTES = 50 * 1024 * 1024  # as the Gradio page's upload limit
MAX_BODY_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 2**20  # that image in base64, and a megabyte for the rest
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")


def _image(url: str):
    """A data: URI -> PIL image, refusing anything else and oversized pictures before decoding."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise RequestError(400, "image_url must be a data: URI (data:image/png;base64,...); this server fetches "
                                "no remote URLs", "messages")
    head, _, payload = url.partition(",")
    media = head[5:].split(";")[0].lower()
    if media not in IMAGE_TYPES or ";base64" not in head:
        raise RequestError(400, f"image_url: expected a base64 data URI of {', '.join(IMAGE_TYPES)}, got "
                                f"{head[:40]!r}", "messages")
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
        raise RequestError(413, f"image is over {MAX_IMAGE_BYTES // 2**20} MB", "messages")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "image_url: the data URI is not valid base64", "messages") from None
    try:
        return load_image(data)  # refuses a pixel count over the cap from the header, before decoding
    except ImageError as e:
        raise RequestError(400, f"image: {e}", "messages") from None


def _task(text: str | None, tasks: dict[str, str]) -> str:
    if text is None or not text.strip():
        return "caption"
    text = text.strip()
    for name, prompt in tasks.items():
        if text == name or text == prompt.strip():
            return name
    listed = ", ".join(f"{n} ({p!r})" for n, p in tasks.items())
    raise RequestError(400, f"the text part must name a task or its prompt; got {text[:80]!r}. Tasks: {listed}",
                       "messages")


def parse(raw: bytes, tasks: dict[str, str], max_tokens: int) -> tuple:
    """A request body -> (image, task, GenerationConfig, ChatCompletionRequest); raises RequestError
    or pydantic's ValidationError (both 400s naming the field through `problem`)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's depth
        raise RequestError(400, "the request body is not valid JSON (or is nested too deeply)") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    chat = ChatCompletionRequest.model_validate(body)
    url, text = chat.user_parts()
    gen = chat.to_generation_config(max_tokens)
    task = _task(text, tasks)
    return _image(url), task, gen, chat  # the image last: decoding it is the costly part


def _error(p: Problem) -> JSONResponse:
    return JSONResponse(p.body(), status_code=p.status)


def router(engine: Engine, model_id: str, max_tokens: int | None = None) -> APIRouter:
    """The routes over `engine`; a request's length is capped at `max_tokens`, by default the engine's cap."""
    api = APIRouter()
    max_tokens = max_tokens or engine.max_new_tokens
    created = int(time.time())
    tasks = dict(engine.model.cfg.tasks)

    @api.get("/v1/models")
    async def models():  # on the loop, never behind a queue of worker threads
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "mm"}]}

    def submit(raw: bytes):
        image, task, gen, chat = parse(raw, tasks, max_tokens)
        return engine.submit(image, task, **asdict(gen)), task, chat

    @api.post("/v1/chat/completions")
    async def completions(request: Request):
        # Parsing, decoding the image and preprocessing run on a worker thread, briefly; the
        # wait for the text is awaited on the loop, so no thread is held per waiting request.
        try:
            raw = await _body(request)
            req, task, chat = await run_in_threadpool(submit, raw)
        except ClientDisconnect:  # gone while sending the body: nobody to answer
            return Response(status_code=499)
        except Exception as e:
            return _error(problem(e))
        prompt_tokens = len(engine.prefix[task])
        head = dict(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=model_id)
        if chat.stream:
            return StreamingResponse(_events(req, head, prompt_tokens, chat.include_usage, engine, task),
                                     media_type="text/event-stream")
        try:
            res = await _result_unless_gone(req, request)
        except Exception as e:  # a stopped engine, or a failed forward; the server keeps serving
            return _error(problem(e, submitting=False))
        if res is None:  # the client hung up; nobody reads this
            return Response(status_code=499)
        choice = Choice(message=AssistantMessage(content=res.text), finish_reason=_finish(res, engine.tok.eos_id),
                        **_judgement(res, engine, task))
        return ChatCompletion(**head, choices=[choice], usage=Usage.of(prompt_tokens, len(res.tokens))).model_dump()

    return api


async def _body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it is known to be over MAX_BODY_BYTES: from its
    declared length before a byte is read, else while it streams in."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, f"the request body is {int(declared)} bytes, over the limit of {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
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


def model_id(cap) -> str:
    """The name `GET /v1/models` lists for a Captioner (and `mm batch` answers with)."""
    return f"mm-{cap.path.name}" if cap.path is not None else "mm-untrained"


def judgement(conf: float, cap, task: str) -> dict:
    """{"confidence", "unfamiliar"} as the API and the page's tables report them: both None when
    the confidence is not a number (JSON has no NaN, and no flag may rest on one)."""
    return reported(conf, math.isfinite(conf) and cap.unfamiliar(conf, task))


def _judgement(res, engine: Engine, task: str) -> dict:
    return judgement(res.stats.confidence[0], engine.cap, task)


async def _events(req, head: dict, prompt_tokens: int, include_usage: bool, engine: Engine, task: str):
    """Server-sent events in the chunk format; a client that goes away cancels the request."""

    def chunk(delta: Delta, finish: str | None = None, usage: Usage | None = None, extra: dict | None = None) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish, **(extra or {}))
        return f"data: {ChatCompletionChunk(**head, choices=[choice], usage=usage).model_dump_json()}\n\n"

    try:
        yield chunk(Delta(role="assistant", content=""))
        async for piece in req.astream():
            yield chunk(Delta(content=piece))
        res = await req.aresult()
        usage = Usage.of(prompt_tokens, len(res.tokens)) if include_usage else None
        yield chunk(Delta(), _finish(res, engine.tok.eos_id), usage, _judgement(res, engine, task))
    except Exception as e:
        yield f"data: {json.dumps(problem(e, submitting=False).body())}\n\n"
    finally:
        req.cancel()  # no-op once finished; frees the row of a client that disconnected
    yield "data: [DONE]\n\n"
