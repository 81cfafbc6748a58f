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


class FunctionCall(Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's newer name for system
    content: Annotated[str | None, BeforeValidator(_text_content)] = None  # None: an assistant's tool calls
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: which call this answers
    refusal: str | None = None  # echoed back by clients that keep whole assistant messages


class Function(Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none = no arguments
    strict: bool | None = None  # every call is generated under its schema anyway


class Tool(Body):
    type: Literal["function"]
    function: Function


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # none: any JSON value
    strict: bool | None = None  # every reply is generated under the schema anyway


class ResponseFormat(Body):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # newer clients send it; the padding it asks for is optional
    continuous_usage_stats: bool | None = None  # vLLM's; usage comes in the last chunk only


def _prompt(value: Any) -> Any:
    """A prompt is a string, a list of strings, a list of token ids or a list of such lists."""
    expected = "expected a non-empty string, a list of them, a list of token ids or a list of lists of token ids"
    items = [value] if isinstance(value, str) or (isinstance(value, list) and value and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)) else value
    if not isinstance(items, list) or not items:
        raise ValueError(expected)
    for item in items:
        if isinstance(item, str) and item:
            continue
        if isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            continue
        raise ValueError(expected)
    return items


class Sampling(Body):
    """Fields shared by both endpoints; ``top_k``, ``min_p``, ``repetition_penalty`` and
    ``ignore_eos`` (for benchmarks: always ``max_tokens``) are extensions, named as in vLLM. The
    bookkeeping fields (``store``, ``metadata``, ``user``, ...) are accepted and change nothing."""

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
    n: int = Field(1, ge=1, le=8)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (a string: JSON keys are) -> [-100, 100]
    min_p: float = Field(0.0, ge=0, le=1)
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    parallel_tool_calls: bool | None = None  # one call per reply either way
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # in the API, not possible here: refused by name (serve.UNSUPPORTED says why)
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    reasoning_effort: Any = None


class CompletionRequest(Sampling):
    prompt: Annotated[list[str | list[int]], BeforeValidator(_prompt)]
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt only (echo + logprobs)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


def _no_constant(name: str) -> Any:
    raise ApiError(400, f"request body: {name} is not JSON (numbers must be finite)")


def parse_body(cls: type[Body], body: bytes) -> Any:
    # pydantic reads NaN and Infinity: refused here, or they would be echoed into a reply no JSON can
    # hold. Parsed a second time only when the bytes could hold one (inside a string they are fine)
    if b"NaN" in body or b"Infinity" in body:
        try:
            json.loads(body, parse_constant=_no_constant)
        except (ValueError, RecursionError):  # not JSON at all: pydantic's message below says where
            pass
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors()
        param, message = describe_error(errors[0])
        more = [describe_error(err)[1] for err in errors[1:3]]
        raise ApiError(400, "; ".join([message, *more]), param) from None


def describe_error(err: Any) -> tuple[str | None, str]:
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
    """OpenAI response bodies for one request: the whole answer, or stream chunks. A choice is
    the dict that sits in ``choices`` without ``index`` and ``finish_reason`` (``message`` or
    ``text``, and ``logprobs``)."""

    shape: Shape
    id: str
    model: str
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))

    def whole(self, choices: list[tuple[dict[str, Any], str | None]], completions: list[Completion],
              cached: int) -> dict[str, Any]:
        body = self._envelope(self.shape.object, self.usage(completions, cached))
        body["choices"] = [{"index": i, **c, "finish_reason": r} for i, (c, r) in enumerate(choices)]
        return body

    def chunk(self, index: int = 0, text: str = "", reason: str | None = None, opening: bool = False,
              logprobs: Any = None, delta: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.shape.chat:
            if delta is None:
                delta = {"role": "assistant", "content": ""} if opening else {"content": text} if text else {}
            choice: dict[str, Any] = {"delta": delta}
        else:
            choice = {"text": text}
        body = self._envelope(self.shape.chunk_object)
        body["choices"] = [{"index": index, **choice, "logprobs": logprobs, "finish_reason": reason}]
        return body

    def usage_chunk(self, completions: list[Completion], cached: int) -> dict[str, Any]:
        return {**self._envelope(self.shape.chunk_object, self.usage(completions, cached)), "choices": []}

    def usage(self, completions: list[Completion], cached: int) -> dict[str, Any]:
        n = sum(len(c.ids) for c in completions)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _envelope(self, obj: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                                "system_fingerprint": None}
        if usage is not None:
            body["usage"] = usage
        return body
