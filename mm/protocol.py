"""The serving surface's protocol: OpenAI's chat-completions request and response as declared
models, their mapping to `GenerationConfig`, and the one mapping from an exception to the error a
client sees, shared by the HTTP route (mm/openai_api.py) and the page (app.py).

Field ranges are not restated here: the decoding options' bounds are read from
`GenerationConfig.LIMITS`, so the route refuses exactly what `Captioner.caption` refuses. The
models are strict (no "5" for 5, no true for 1, no NaN), and a validation error becomes a 400
naming the field, e.g. `temperature must be a finite number in 0..100 (0 = greedy), got 101`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lm import ConfigError
from mm.engine import Cancelled, EngineBusy, EngineClosed
from mm.generate import GenerationConfig
from vision.preprocess import ImageError

# The request's decoding fields: (the GenerationConfig option each sets, its type).
OPTION_FIELDS = {"max_tokens": ("max_new_tokens", int), "max_completion_tokens": ("max_new_tokens", int),
                 "temperature": ("temperature", float), "top_p": ("top_p", float), "seed": ("seed", int)}


def _option(name: str):
    """A request field typed and bounded as GenerationConfig states for its option (null: the default)."""
    option, kind = OPTION_FIELDS[name]
    finite = {"allow_inf_nan": False} if kind is float else {}
    return Annotated[kind, Field(**GenerationConfig.LIMITS[option].bounds(), **finite)] | None


def _option_message(name: str, value) -> str:
    """`temperature must be a finite number in 0..100 (0 = greedy), got 101`: the range in GenerationConfig's words."""
    option, kind = OPTION_FIELDS[name]
    limit = GenerationConfig.LIMITS[option]
    what = "an integer" if kind is int else "a finite number"
    return f"{name} must be {what} {limit.stated}, got {short(value)}"


def _request_error(message: str) -> PydanticCustomError:
    """A validation error whose message completes a sentence about the field: "must be 1"."""
    return PydanticCustomError("request", message)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # unknown OpenAI fields are ignored, as before


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _has_its_payload(self):
        if self.type == "text" and self.text is None:
            raise _request_error("(a text part) needs its text as a string")
        if self.type == "image_url" and self.image_url is None:
            raise _request_error("(an image_url part) needs an image_url object holding a url")
        return self


class Message(_Strict):
    role: str
    content: list[ContentPart] = []

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, content):
        """A plain string is one text part; null (an assistant turn) is none."""
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if content is not None and not isinstance(content, list):
            raise _request_error(f"must be a string or a list of content parts, got {short(content)}")
        return [] if content is None else content


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """`POST /v1/chat/completions`: the last user message holds one image_url part and at most
    a text part naming the task. temperature defaults to 0 (greedy, what a captioner wants)."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: _option("max_tokens") = None
    max_completion_tokens: _option("max_completion_tokens") = None
    temperature: _option("temperature") = None
    top_p: _option("top_p") = None
    seed: _option("seed") = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n", mode="before")
    @classmethod
    def _one_choice(cls, n):
        if type(n) is not int or n != 1:
            raise _request_error(f"must be 1 (one choice per request), got {short(n)}")
        return n

    def user_parts(self) -> tuple[str, str | None]:
        """(the image's url, the text naming the task or None) from the last user message."""
        user = [m for m in self.messages if m.role == "user"]
        if not user:
            raise RequestError(400, "messages need a user message holding the image", "messages")
        parts = user[-1].content
        images = [p.image_url.url for p in parts if p.type == "image_url"]
        if len(images) != 1:
            raise RequestError(400, f"send exactly one image_url part in the last user message (got {len(images)})",
                               "messages")
        return images[0], " ".join(p.text for p in parts if p.type == "text") or None

    def to_generation_config(self, max_tokens: int) -> GenerationConfig:
        """The request's decoding options; `max_tokens` is this server's cap on the length."""
        field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        length = getattr(self, field)
        if length is not None and length > max_tokens:
            raise RequestError(400, f"{field} must be at most {max_tokens} on this server, got {length}", field)
        chosen = {"max_new_tokens": length, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}
        gen = GenerationConfig(**{k: v for k, v in chosen.items() if v is not None})  # null: the default
        gen.max_new_tokens = min(gen.max_new_tokens, max_tokens)
        return gen.validate()

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# --- responses ---------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    confidence: float | None  # mm/confidence.py; None when not a number
    unfamiliar: bool | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


def _omitted_when_none(default=None):
    return Field(default, exclude_if=lambda v: v is None)


class Delta(BaseModel):
    role: Literal["assistant"] | None = _omitted_when_none()
    content: str | None = _omitted_when_none()


class ChunkChoice(BaseModel):
    model_config = ConfigDict(extra="allow")  # the last chunk adds confidence and unfamiliar, as Choice has

    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = _omitted_when_none()  # on the last chunk, when stream_options.include_usage


# --- errors --------------------------------------------------------------------------------------

@dataclass
class Problem:
    """What a client is told: an HTTP status, OpenAI's error type, a message, the field at fault."""

    status: int
    message: str
    kind: str = "invalid_request_error"
    param: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class RequestError(Exception):
    """A request refused before it reached the engine."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.problem = Problem(status, message, kind, param)


def problem(exc: BaseException, submitting: bool = True) -> Problem:
    """The one mapping from an exception to a client's error, for the route and the page alike.
    While submitting, bad input (options, image, task) is the client's 400; once the engine has
    the request, anything but a stop or a cancel is the server's failure (500)."""
    if isinstance(exc, RequestError):
        return exc.problem
    if isinstance(exc, ValidationError):
        return validation_problem(exc)
    if isinstance(exc, EngineBusy):
        return Problem(429, f"The server is busy ({exc}).", "server_busy")
    if isinstance(exc, (EngineClosed, Cancelled)):
        return Problem(503, f"captioning stopped: {exc}", "server_error")
    if submitting and isinstance(exc, (ConfigError, ImageError, ValueError, TypeError)):
        return Problem(400, str(exc))
    return Problem(500, f"captioning failed: {exc}", "server_error")


def validation_problem(exc: ValidationError) -> Problem:
    """A 400 naming each bad field: `messages[0].content[1].image_url.url must be a valid string, got 12`."""
    messages = []
    for err in exc.errors(include_url=False)[:5]:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "the body"
        if len(err["loc"]) == 1 and err["loc"][0] in OPTION_FIELDS:
            messages.append(_option_message(err["loc"][0], err["input"]))
        elif err["type"] == "request":  # our own sentence
            messages.append(f"{where} {err['msg']}")
        elif err["type"] == "missing":
            messages.append(f"{where} is required")
        elif err["msg"].startswith("Input should be "):
            what = re.sub(r"a valid dictionary or instance of \w+", "an object", err["msg"][16:])
            messages.append(f"{where} must be {what}, got {short(err['input'])}")
        else:
            messages.append(f"{where}: {err['msg']}")
    first = exc.errors(include_url=False)[0]["loc"]
    return Problem(400, "; ".join(messages), param=str(first[0]) if first else None)


def short(value) -> str:
    """A client's value for a message: its repr, cut (it may be megabytes)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
