"""OpenAI requests -> engine jobs, and engine results -> OpenAI choices.

A request becomes a ``Plan``: one ``Job`` per choice (``n`` samples of each prompt, prompt-major,
as OpenAI numbers ``index``), the sampling parameters checked against the model's context and
vocabulary, and what each choice must report (echoed prompt, logprobs in the endpoint's shape).
Everything a client can get wrong is an ``ApiError`` 400 naming the parameter, raised here,
before anything reaches the engine thread.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from havoc_core.engine import Completion
from havoc_core.errors import HavocError
from havoc_core.grammar import ANY_OBJECT, Grammars, SchemaError
from havoc_core.openai_api import ApiError, ChatRequest, CompletionRequest, Sampling
from havoc_core.openai_logprobs import TokenTexts, chat, legacy
from havoc_core.sampling import SamplingError, SamplingParams
from havoc_core.server_loop import Done, Job, Piece
from havoc_core.tokenizer import render_chat

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}  # a tool without parameters
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context

# fields of OpenAI's chat API that this server cannot honour, and why
UNSUPPORTED = {
    "audio": "audio output is not supported: this server generates text only",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "functions": "the deprecated `functions` are not supported",
    "function_call": "the deprecated `function_call` is not supported",
    "reasoning_effort": "this model has no reasoning mode",
}


@dataclass
class Plan:
    """What a request asks of the engine and how its choices are reported."""

    chat: bool
    jobs: list[Job]
    prompt_tokens: int
    texts: TokenTexts
    logprobs: int | None = None  # alternatives per token when logprobs were asked for
    echo: list[str] = field(default_factory=list)  # per job: the prompt text to echo (completions)
    tool_call: bool = False  # the reply is a forced tool call, reported as tool_calls

    def choice(self, index: int, done: Done) -> tuple[dict[str, Any], str | None]:
        """(the choice's body, finish_reason) of job ``index``."""
        c: Completion = done.completion
        text = (self.echo[index] if self.echo else "") + c.text
        logprobs: Any = None
        if self.logprobs is not None and self.chat:
            logprobs = {"content": chat(self.texts, c.logprobs or []), "refusal": None}
        elif self.logprobs is not None:
            ids, entries = list(c.ids), list(c.logprobs or [])
            if self.echo:
                ids, entries = self.jobs[index].ids + ids, list(done.prompt_logprobs or []) + entries
            logprobs = legacy(self.texts, ids, entries)
        if self.tool_call and c.finish_reason == "stop":
            calls = tool_calls(text)
            if calls is not None:
                return {"message": {"role": "assistant", "content": None, "tool_calls": calls},
                        "logprobs": logprobs}, "tool_calls"
        body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {**body, "logprobs": logprobs}, c.finish_reason

    def piece(self, piece: Piece, offset: int) -> Any:
        """The logprobs of one streamed token (``offset``: characters of the choice sent so far)."""
        if self.chat:
            return {"content": chat(self.texts, [piece.logprob]), "refusal": None}
        return legacy(self.texts, [piece.logprob.token], [piece.logprob], offset)


def tool_calls(text: str) -> list[dict[str, Any]] | None:
    """OpenAI's ``tool_calls`` of a forced call's reply, or None if a stop string cut it short."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}]


def chat_messages(req: ChatRequest) -> list[dict[str, str]]:
    """OpenAI messages as the chat template's three roles. The template has no tool format, so an
    assistant's tool calls become the JSON a forced call generates (``{"name", "arguments"}``, what
    the model would have written), and a tool's result a user turn ``Result of NAME: ...``."""
    names: dict[str, str] = {}
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if m.role == "assistant" and m.tool_calls:
            parts = [content] if content else []
            for j, call in enumerate(m.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    raise ApiError(400, f"messages[{i}].tool_calls[{j}].function.arguments: expected JSON text, "
                                   f"found {call.function.arguments[:60]!r}",
                                   f"messages[{i}].tool_calls[{j}].function.arguments") from None
                names[call.id] = call.function.name
                parts.append(json.dumps({"name": call.function.name, "arguments": arguments}, ensure_ascii=False))
            content = "\n".join(parts)
        if content is None:
            raise ApiError(400, f"messages[{i}].content: required (only an assistant turn with tool_calls "
                           "may leave it out)", f"messages[{i}].content")
        role = {"developer": "system", "tool": "user"}.get(m.role, m.role)
        if m.role == "tool":
            if m.tool_call_id is None:
                raise ApiError(400, f"messages[{i}].tool_call_id: required in a tool message",
                               f"messages[{i}].tool_call_id")
            content = f"Result of {names.get(m.tool_call_id, m.name or 'the tool')}: {content}"
        out.append({"role": role, "content": content})
    return out


class Planner:
    """Builds ``Plan``s for one model (its tokenizer, context and vocabulary)."""

    def __init__(self, tokenizer: Any, context: int, vocab_size: int, grammars: Callable[[], Grammars]) -> None:
        """``grammars``: the engine's schema compiler (``Engine.grammars``), so a schema checked
        here is compiled once, for the engine that enforces it."""
        self.tokenizer, self.context, self.vocab_size = tokenizer, context, vocab_size
        self.texts = TokenTexts(tokenizer)
        self.chat_stop_ids = tokenizer.turn_stop_ids()
        self.engine_grammars = grammars

    def chat(self, req: ChatRequest) -> Plan:
        for name, why in UNSUPPORTED.items():
            if getattr(req, name) is not None:
                raise ApiError(400, f"{name}: {why}", name)
        if req.modalities is not None and req.modalities != ["text"]:
            raise ApiError(400, f"modalities: only [\"text\"] is supported, found {req.modalities}", "modalities")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        schema, param = self.response_schema(req), "response_format"
        tool_schema = self.tool_schema(req)
        if tool_schema is not None:
            if schema is not None:
                raise ApiError(400, "response_format: not with a forced tool call (tool_choice), which is JSON "
                               "under the tool's schema already", "response_format")
            schema, param = tool_schema, "tools"
        if schema is not None:
            try:
                self.grammars().compile(schema)
            except SchemaError as e:
                raise ApiError(400, f"{param}: the schema {str(e).removeprefix('json_schema: ')}", param) from None
        ids = render_chat(self.tokenizer, chat_messages(req), add_generation_prompt=True)[0]
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling(req, ids, req.max_completion_tokens or req.max_tokens, None, "messages",
                               self.chat_stop_ids, logprobs, json_schema=schema)
        return Plan(True, [Job(ids, p) for p in params.samples()], len(ids), self.texts, logprobs,
                    tool_call=tool_schema is not None)

    def grammars(self) -> Grammars:
        try:
            return self.engine_grammars()
        except HavocError as e:  # llguidance not installed
            raise ApiError(400, f"response_format: {e}", "response_format") from None

    @staticmethod
    def response_schema(req: ChatRequest) -> dict[str, Any] | None:
        fmt = req.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return ANY_OBJECT
        if fmt.json_schema is None:
            raise ApiError(400, "response_format.json_schema: required with type json_schema",
                           "response_format.json_schema")
        return fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}

    @staticmethod
    def tool_schema(req: ChatRequest) -> dict[str, Any] | None:
        """The schema of a forced call (``tool_choice`` "required" or a named function):
        ``{"name": ..., "arguments": {...}}``. None when the model answers in text ("none", or
        "auto": the chat template has no tool format, so the model is never offered the tools)."""
        choice, tools = req.tool_choice, req.tools or []
        if choice is None or choice in ("none", "auto"):
            return None
        if not tools:
            raise ApiError(400, "tool_choice: needs tools", "tool_choice")
        if choice == "required":
            chosen = tools
        else:
            chosen = [t for t in tools if t.function.name == choice.function.name]  # type: ignore[union-attr]
            if not chosen:
                names = ", ".join(t.function.name for t in tools)
                raise ApiError(400, f"tool_choice.function.name: {choice.function.name!r} is not one of the "  # type: ignore[union-attr]
                               f"tools ({names})", "tool_choice")
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                  "properties": {"name": {"const": t.function.name},
                                 "arguments": t.function.parameters or NO_ARGUMENTS}} for t in chosen]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}

    def completion(self, req: CompletionRequest) -> Plan:
        if req.suffix is not None:
            raise ApiError(400, "suffix: not supported (this model has no fill-in-the-middle format)", "suffix")
        if req.best_of is not None and req.best_of > req.n:
            raise ApiError(400, f"best_of: {req.best_of} > n={req.n} is not supported (every sample is "
                           "returned; set best_of to n or leave it out)", "best_of")
        if req.stream and req.echo and req.logprobs is not None:
            raise ApiError(400, "echo: with logprobs, only without stream", "echo")
        jobs, echo, total = [], [], 0
        for i, prompt in enumerate(req.prompt):
            where = "prompt" if len(req.prompt) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                ids, text = [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)], prompt
            else:
                bad = [t for t in prompt if not 0 <= t < self.vocab_size]
                if bad:
                    raise ApiError(400, f"{where}: token ids must be in [0, {self.vocab_size}), found {bad[0]}",
                                   "prompt")
                ids, text = list(prompt), self.tokenizer.decode(prompt)
            total += len(ids)
            scoring = req.max_tokens == 0
            params = self.sampling(req, ids, 1 if scoring else req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS,
                                   where, [], req.logprobs, context_param="prompt")
            top = req.logprobs if req.echo and req.logprobs is not None else None
            for p in params.samples():
                jobs.append(Job(ids, None if scoring else p, top))
                echo.append(text)
        return Plan(False, jobs, total, self.texts, req.logprobs, echo if req.echo else [])

    def sampling(self, req: Sampling, ids: list[int], max_tokens: int | None, default: int | None, where: str,
                 stop_ids: list[int], logprobs: int | None, context_param: str | None = None,
                 json_schema: dict[str, Any] | None = None) -> SamplingParams:
        room = self.context - len(ids)
        if room < 1:
            raise ApiError(400, f"{where}: {len(ids)} tokens; the model's context is {self.context} tokens "
                           "(max_seq_len) and the reply needs at least one", context_param or where,
                           "context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"max_tokens: {max_tokens} plus the prompt's {len(ids)} tokens exceed the "
                           f"context of {self.context} tokens (at most {room} here)", "max_tokens",
                           "context_length_exceeded")
        params = SamplingParams(
            max_new_tokens=max_tokens or min(default or room, room), temperature=req.temperature,
            top_p=req.top_p, top_k=req.top_k, repetition_penalty=req.repetition_penalty, seed=req.seed,
            stop=tuple(req.stop or ()), stop_ids=stop_ids, ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, min_p=req.min_p,
            logit_bias=self.logit_bias(req.logit_bias), n=req.n, logprobs=logprobs, json_schema=json_schema)
        try:
            return params.validate()
        except SamplingError as e:
            raise ApiError(400, str(e), e.field) from None

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        out = {}
        for key, value in (bias or {}).items():
            if not key.isdigit() or int(key) >= self.vocab_size:
                raise ApiError(400, f"logit_bias: keys must be token ids in [0, {self.vocab_size}), found {key!r}",
                               "logit_bias")
            if not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias[{key}]: expected a number in [-100, 100], found {value}",
                               "logit_bias")
            out[int(key)] = value
        return out
