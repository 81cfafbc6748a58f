"""``POST /v1/responses``: the subset of OpenAI's Responses API that text-only clients use (the
newer ``client.responses`` calls, the Agents SDK's text path).

A request is translated into a chat request (``input`` -> messages, ``instructions`` -> a system
turn, ``text.format`` -> ``response_format``) and planned and generated like one; the reply is
built as a Response object, or streamed as the Responses event sequence (``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``..., the matching ``.done`` events, ``response.completed`` or
``response.incomplete``). The server keeps no state: ``previous_response_id`` and
``conversation`` are refused by name (send the whole conversation in ``input``).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import Field, ValidationError

from havoc_core.openai_api import ApiError, Body, ChatRequest, StreamOptions, describe_error
from havoc_core.server_loop import Done, Item

UNSUPPORTED = {
    "previous_response_id": "this server keeps no responses: send the whole conversation in input",
    "conversation": "this server keeps no conversations: send the whole conversation in input",
    "reasoning": "this model has no reasoning mode",
    "background": "background responses are not supported",
    "prompt": "stored prompts are not supported",
    "max_tool_calls": "tools are not supported on /v1/responses (use /v1/chat/completions)",
}
PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


class ResponsesRequest(Body):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    text: dict[str, Any] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None  # only empty: tool calls are on /v1/chat/completions
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled"] | None = None
    include: list[str] | None = None
    store: bool | None = None  # accepted; nothing is stored
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    previous_response_id: Any = None
    conversation: Any = None
    reasoning: Any = None
    background: Any = None
    prompt: Any = None
    max_tool_calls: Any = None


def chat_request(req: ResponsesRequest) -> ChatRequest:
    """The chat request that generates this response; ApiError naming the Responses field."""
    for name, why in UNSUPPORTED.items():
        if getattr(req, name) is not None:
            raise ApiError(400, f"{name}: {why}", name)
    if req.tools:
        raise ApiError(400, "tools: not supported on /v1/responses (use /v1/chat/completions)", "tools")
    if req.include:
        raise ApiError(400, f"include: nothing extra can be included, found {req.include}", "include")
    messages = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
    messages += [{"role": "user", "content": req.input}] if isinstance(req.input, str) else [
        _message(i, item) for i, item in enumerate(req.input)]
    body: dict[str, Any] = {"model": req.model, "messages": messages, "temperature": req.temperature,
                            "top_p": req.top_p, "max_tokens": req.max_output_tokens}
    fmt = (req.text or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise ApiError(400, "text.format: expected {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                           f"{{\"type\": \"json_schema\", \"name\", \"schema\"}}, found {json.dumps(fmt)[:80]}",
                           "text.format")
        inner = {k: v for k, v in fmt.items() if k != "type"}
        body["response_format"] = ({"type": "json_schema", "json_schema": inner} if fmt["type"] == "json_schema"
                                   else {"type": fmt["type"]})
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as e:
        param, message = describe_error(e.errors()[0])
        raise renamed(ApiError(400, message, param)) from None


def _message(i: int, item: dict[str, Any]) -> dict[str, str]:
    where = f"input[{i}]"
    if item.get("type", "message") != "message":
        raise ApiError(400, f"{where}.type: only message items are supported, found {item.get('type')!r}", "input")
    role, content = item.get("role"), item.get("content")
    if role not in ("system", "developer", "user", "assistant"):
        raise ApiError(400, f"{where}.role: expected system, developer, user or assistant, found {role!r}", "input")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text") or \
                    not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.content[{j}]: expected an input_text or output_text part, found "
                               f"{json.dumps(part)[:60]}", "input")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content: expected a string or a list of text parts", "input")
    return {"role": role, "content": content}


def renamed(e: ApiError) -> ApiError:
    """A chat-request error in the Responses API's own field names."""
    for chat_name, name in PARAMS.items():
        if e.param is not None and e.param.startswith(chat_name):
            e.param = name + e.param[len(chat_name):]
            e.message = e.message.replace(chat_name, name, 1)
    return e


class Responder:
    """The Response object of one request, whole or as events."""

    def __init__(self, req: ResponsesRequest, prompt_tokens: int) -> None:
        self.req, self.prompt_tokens = req, prompt_tokens
        self.id, self.message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.seq = 0

    def response(self, done: Done | None) -> dict[str, Any]:
        status, details, output, usage = "in_progress", None, [], None
        if done is not None:
            c = done.completion
            cut = c.finish_reason == "length"
            status = "incomplete" if cut else "completed"
            details = {"reason": "max_output_tokens"} if cut else None
            output = [self.message(c.text, "incomplete" if cut else "completed")]
            usage = {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": done.cached},
                     "output_tokens": len(c.ids), "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": self.prompt_tokens + len(c.ids)}
        r = self.req
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "completed_at": int(time.time()) if status == "completed" else None, "error": None,
                "incomplete_details": details, "instructions": r.instructions,
                "max_output_tokens": r.max_output_tokens, "model": r.model, "output": output,
                "parallel_tool_calls": False, "previous_response_id": None, "reasoning": None,
                "store": False, "temperature": r.temperature, "text": r.text or {"format": {"type": "text"}},
                "tool_choice": r.tool_choice or "none", "tools": [], "top_p": r.top_p, "truncation": "disabled",
                "usage": usage, "user": r.user, "metadata": r.metadata or {}}

    def message(self, text: str, status: str) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [self.part(text)] if status != "in_progress" else []}

    @staticmethod
    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self, stream: AsyncIterator[tuple[int, Item]]) -> AsyncIterator[str]:
        """The Responses event sequence of one generation. Closing it (client gone) stops the request."""
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        yield self.event("response.created", response=self.response(None))
        yield self.event("response.in_progress", response=self.response(None))
        yield self.event("response.output_item.added", output_index=0, item=self.message("", "in_progress"))
        yield self.event("response.content_part.added", part=self.part(""), **where)
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            try:
                async for _, item in stream:
                    if isinstance(item, Done):
                        text = item.completion.text
                        whole = self.response(item)
                        yield self.event("response.output_text.done", text=text, logprobs=[], **where)
                        yield self.event("response.content_part.done", part=self.part(text), **where)
                        yield self.event("response.output_item.done", output_index=0, item=whole["output"][0])
                        kind = "response.completed" if whole["status"] == "completed" else "response.incomplete"
                        yield self.event(kind, response=whole)
                    elif isinstance(item, str) and item:
                        yield self.event("response.output_text.delta", delta=item, logprobs=[], **where)
            except ApiError as e:
                yield self.event("error", code=e.code, message=e.message, param=e.param)
