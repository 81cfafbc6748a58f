"""OpenAI's API shapes: request bodies (strict, pydantic), their one-line errors, and response bodies.

Errors use OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``. A field that is not
in the API is a 400 naming it (typos stay visible).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from havoc_core.engine import Completion


class ApiError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- request bodies

def _text_content(value: Any) -> Any:
    """OpenAI content is a string or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in value):
            raise ValueError("expected a string or a list of {\"type\": \"text\", \"text\": ...} parts")
        return "".join(p["text"] for p in value)
    return value


def _stop_list(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if value is not None and not isinstance(value, list):
        raise ValueError("expected a string or a list of strings")
    return value


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: Annotated[str, BeforeValidator(_text_content)]
    name: str | None = None


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """Fields shared by both endpoints; ``top_k``, ``repetition_penalty`` and ``ignore_eos`` (for
    benchmarks: always ``max_tokens``) are extensions, named as in vLLM."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    stop: Annotated[list[Annotated[str, Field(min_length=1)]] | None, BeforeValidator(_stop_list)] = \
        Field(None, max_length=4)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)


def parse_body(cls: type[Body], body: bytes) -> Any:
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors()
        param, message = _describe(errors[0])
        more = [_describe(err)[1] for err in errors[1:3]]
        raise ApiError(400, "; ".join([message, *more]), param) from None


def _describe(err: Any) -> tuple[str | None, str]:
    """(param, one-line message) for a pydantic error: the field, what was expected, what was found."""
    loc = err["loc"]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    where = param or "request body"
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return param, f"{where}: unknown field (not part of the API, or not supported by this server)"
    if kind == "missing":
        return param, f"{where}: required"
    if kind == "json_invalid":
        return param, f"{where}: {msg[0].lower()}{msg[1:]}"
    if kind == "model_type":
        msg = "expected a JSON object"
    elif kind == "too_short":
        msg = "expected at least one"
    msg = msg.removeprefix("Value error, ").replace("Input should be", "expected")
    msg = msg[0].lower() + msg[1:]
    found = json.dumps(err.get("input"), default=str)
    return param, f"{where}: {msg}, found {found[:80] + '...' if len(found) > 80 else found}"


@dataclass(frozen=True)
class Shape:
    """Where the two endpoints' JSON differs: chat carries messages and deltas, completions text."""

    prefix: str
    object: str
    chunk_object: str
    chat: bool


CHAT = Shape("chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)
COMPLETION = Shape("cmpl", "text_completion", "text_completion", chat=False)


@dataclass
class Reply:
    """OpenAI response bodies for one request: the whole answer, or stream chunks."""

    shape: Shape
    id: str
    model: str
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))

    def whole(self, c: Completion, cached: int) -> dict[str, Any]:
        body = {"message": {"role": "assistant", "content": c.text}} if self.shape.chat else {"text": c.text}
        return self._envelope(self.shape.object, body, c.finish_reason, self.usage(c, cached))

    def chunk(self, text: str = "", reason: str | None = None, opening: bool = False) -> dict[str, Any]:
        if self.shape.chat:
            delta = {"role": "assistant", "content": ""} if opening else {"content": text} if text else {}
            return self._envelope(self.shape.chunk_object, {"delta": delta}, reason)
        return self._envelope(self.shape.chunk_object, {"text": text}, reason)

    def usage_chunk(self, c: Completion, cached: int) -> dict[str, Any]:
        return {**self._envelope(self.shape.chunk_object, None, None, self.usage(c, cached)), "choices": []}

    def usage(self, c: Completion, cached: int) -> dict[str, Any]:
        n = len(c.ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _envelope(self, obj: str, choice: dict[str, Any] | None, reason: str | None,
                  usage: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                                "system_fingerprint": None}
        if choice is not None:
            body["choices"] = [{"index": 0, **choice, "logprobs": None, "finish_reason": reason}]
        if usage is not None:
            body["usage"] = usage
        return body


