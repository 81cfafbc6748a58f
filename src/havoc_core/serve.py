"""OpenAI-compatible HTTP server with continuous batching, and a web chat page (``havoc serve``).

One thread owns the model: ``EngineLoop`` drives a ``generate.Engine`` (add / step / finish), so
requests that arrive while others are decoding join the batch between two decode steps, finished
ones leave, and a request whose client disconnected is stopped at the next step. The asyncio event
loop only parses, tokenises (in a worker thread), awaits text deltas and writes JSON / SSE; it never
waits on the model. Prompts use the one chat format (``tokenizer.render_chat``); an idle slot keeps
its KV cache, so a conversation's next turn prefills only its new tokens.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming SSE or not),
``GET /v1/models``, ``GET /health``, and the chat page at ``/`` (static files, no external assets).
Errors use OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import queue
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles

from havoc_core.errors import HavocError
from havoc_core.generate import Completion, Engine, Quantize, SamplingParams, is_packed
from havoc_core.tokenizer import ROLES, render_chat

MAX_BODY_BYTES = 1 << 20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
PAGE_HEADERS = {  # the chat page loads nothing from elsewhere and runs no inline script
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


class ApiError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- the engine thread

@dataclass
class Done:
    """The end of a request: the engine's ``Completion`` and how many prompt tokens its slot's
    cache already held (reported as ``usage.prompt_tokens_details.cached_tokens``)."""

    completion: Completion
    cached: int


@dataclass
class _Request:
    """One generation request as the engine thread sees it; results go back through ``out``."""

    ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[str | Done | ApiError] = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the event loop when the client is gone
    cached: int = 0  # prompt tokens found in the slot's cache (not prefilled again)


def _deliver(items: list[tuple[_Request, str | Done | ApiError]]) -> None:
    for request, item in items:
        request.out.put_nowait(item)


class EngineLoop:
    """The thread that owns an ``Engine``: admits queued requests into free slots (the slot whose
    cache holds the longest prefix of the prompt), runs one batched decode step for all running
    requests, and hands each request its text deltas and, at the end, a ``Done``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.Queue[_Request | None] = queue.Queue()
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}
        self._thread = threading.Thread(target=self._loop, name="havoc-engine", daemon=True)
        self._outbox: list[tuple[_Request, str | Done | ApiError]] = []
        self.counts = {"completed": 0, "aborted": 0, "failed": 0}
        self.batch_peak = 0  # the most requests decoded in one step so far

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        return {"slots": len(self.engine.slots), "running": len(self._running),
                "waiting": len(self._waiting) + self._inbox.qsize(), "batch_peak": self.batch_peak,
                "requests": dict(self.counts)}

    async def generate(self, ids: list[int], params: SamplingParams) -> AsyncIterator[str | Done]:
        """Text deltas, then ``Done``. Leaving early (client gone) stops the request."""
        if not self.alive():
            raise ApiError(503, "the server is shutting down", kind="server_error")
        request = _Request(ids, params, asyncio.get_running_loop())
        self._inbox.put(request)
        try:
            while True:
                item = await request.out.get()
                if isinstance(item, ApiError):
                    raise item
                yield item
                if isinstance(item, Done):
                    return
        finally:
            request.cancelled = True  # no effect once finished; otherwise frees the slot at the next step

    # ------------------------------------------------------------------ engine thread only

    def _loop(self) -> None:
        try:
            while self._take(block=not self._running and not self._waiting):
                for slot, request in list(self._running.items()):
                    if request.cancelled:
                        self.engine.finish(slot)
                        del self._running[slot]
                        self.counts["aborted"] += 1
                self._admit()
                if self._running:
                    self._step()
                self._flush()
        finally:  # closing (or a bug here): nobody may wait forever
            self._take(block=False)
            for request in [*self._running.values(), *self._waiting]:
                self._send(request, ApiError(503, "the server is shutting down", kind="server_error"))
            self._flush()

    def _send(self, request: _Request, item: str | Done | ApiError) -> None:
        self._outbox.append((request, item))

    def _flush(self) -> None:
        """Hand this step's output to the event loop(s) in one wake-up each, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, str | Done | ApiError]]] = {}
        for request, item in self._outbox:
            by_loop.setdefault(request.loop, []).append((request, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                for request, _ in items:
                    request.cancelled = True

    def _take(self, block: bool) -> bool:
        """Move new requests from the inbox to the waiting line (waiting for one when idle);
        False once the server is closing."""
        try:
            item = self._inbox.get(block=block)
            while item is not None:
                self._waiting.append(item)
                item = self._inbox.get_nowait()
            return False
        except queue.Empty:
            return True

    def _admit(self) -> None:
        """Move waiting requests into free slots; those admitted together share prefill passes."""
        batch: list[tuple[int, _Request]] = []
        while self._waiting:
            slot = self.engine.free_slot(self._waiting[0].ids, exclude={s for s, _ in batch})
            if slot is None:
                break
            request = self._waiting.popleft()
            if request.cancelled:
                self.counts["aborted"] += 1
                continue
            batch.append((slot, request))
        if not batch:
            return
        try:
            self.engine.add_batch([(r.ids, r.params, slot) for slot, r in batch])
        except Exception as e:  # validated before queueing, so this is a server fault
            for slot, request in batch:
                self.engine.remove(slot)
                self.counts["failed"] += 1
                self._send(request, ApiError(500, f"prefill failed: {e}", kind="server_error"))
            return
        for slot, request in batch:
            request.cached = self.engine.slots[slot].cached  # type: ignore[union-attr]
            self._running[slot] = request

    def _step(self) -> None:
        self.batch_peak = max(self.batch_peak, len(self._running))
        try:
            events = self.engine.step()
        except Exception as e:  # e.g. NaN logits: fail the batch, keep serving
            for slot, request in self._running.items():
                self.engine.remove(slot)
                self._send(request, ApiError(500, f"generation failed: {e}", kind="server_error"))
            self.counts["failed"] += len(self._running)
            self._running.clear()
            return
        for event in events:
            request = self._running[event.slot]
            if event.text:
                self._send(request, event.text)
            if event.finish_reason is not None:
                self._send(request, Done(self.engine.result(event.slot), request.cached))
                del self._running[event.slot]
                self.counts["completed"] += 1


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


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: Annotated[str, BeforeValidator(_text_content)]
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
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


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1)


def _parse(cls: type[_Body], body: bytes) -> Any:
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


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed ``limit`` bytes."""
    too_big = ApiError(413, f"request body: larger than the limit of {limit:,} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- the app

@dataclass
class _Prepared:
    ids: list[int]
    params: SamplingParams


def create_app(model: Any, tokenizer: Any, *, model_name: str = "havoc", api_key: str | None = None,
               max_batch: int = 32, max_body_bytes: int = MAX_BODY_BYTES, pack: bool | None = None) -> FastAPI:
    """The ASGI app for one model; its engine thread runs while the app does (lifespan)."""
    runner = EngineLoop(Engine(model, tokenizer, max_batch=max_batch, pack=pack))
    context = model.config.max_seq_len
    created = int(time.time())
    chat_stop_ids = [tokenizer.bos_id, tokenizer.pad_id, *(tokenizer.role_id(r) for r in ROLES)]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner.start()
        try:
            yield
        finally:
            await asyncio.to_thread(runner.close)

    app = FastAPI(title="HAVOC", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine_loop = runner

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code, headers=e.headers)

    async def check_key(request: Request) -> None:  # async: no threadpool hop per request
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            what = "missing" if not given else "wrong"
            raise ApiError(401, f"API key: {what} (send the header `Authorization: Bearer <key>`)",
                           code="invalid_api_key")

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "havoc",
                "max_model_len": context}

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"model: {name!r} is not served here; this server serves {model_name!r}",
                           "model", "model_not_found")

    def sampling(req: _Sampling, ids: list[int], max_tokens: int | None, default: int | None,
                 where: str, stop_ids: list[int]) -> _Prepared:
        room = context - len(ids)
        if room < 1:
            raise ApiError(400, f"{where}: {len(ids)} tokens; the model's context is {context} tokens "
                           "(max_seq_len) and the reply needs at least one", where, "context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"max_tokens: {max_tokens} plus the prompt's {len(ids)} tokens exceed the "
                           f"context of {context} tokens (at most {room} here)", "max_tokens",
                           "context_length_exceeded")
        params = SamplingParams(
            max_new_tokens=max_tokens or min(default or room, room), temperature=req.temperature,
            top_p=req.top_p, top_k=req.top_k, repetition_penalty=req.repetition_penalty, seed=req.seed,
            stop=tuple(req.stop or ()), stop_ids=stop_ids, ignore_eos=req.ignore_eos)
        try:
            params.validate()
        except HavocError as e:
            raise ApiError(400, str(e)) from None
        return _Prepared(ids, params)

    def prepare_chat(req: ChatRequest) -> _Prepared:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in req.messages]
        ids = render_chat(tokenizer, messages, add_generation_prompt=True)[0]
        return sampling(req, ids, req.max_completion_tokens or req.max_tokens, None, "messages", chat_stop_ids)

    def prepare_completion(req: CompletionRequest) -> _Prepared:
        ids = [tokenizer.bos_id, *tokenizer.encode(req.prompt)]
        return sampling(req, ids, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt", [])

    async def handle(request: Request, cls: type[_Sampling], prepare: Callable[[Any], _Prepared],
                     shape: _Shape) -> Response:
        req = _parse(cls, await _read_body(request, max_body_bytes))
        check_model(req.model)
        job = await asyncio.to_thread(prepare, req)  # tokenising a long prompt must not stall the loop
        reply = _Reply(shape, f"{shape.prefix}-{uuid.uuid4().hex}", model_name, len(job.ids))
        stream = runner.generate(job.ids, job.params)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_sse(stream, reply, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        done = await _until_done_or_gone(stream, request)
        if done is None:
            return Response(status_code=499)  # the client left; nobody reads this
        return JSONResponse(reply.whole(done))

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request) -> Response:
        return await handle(request, ChatRequest, prepare_chat, CHAT)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request) -> Response:
        return await handle(request, CompletionRequest, prepare_completion, COMPLETION)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(check_key)])
    async def model_info(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = runner.alive()
        body = {"status": "ok" if ok else "stopped", "model": model_name, "context": context, **runner.stats()}
        return JSONResponse(body, status_code=200 if ok else 503)

    html = resources.files("havoc_core").joinpath("static/index.html").read_text(encoding="utf-8")  # read once

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers={**PAGE_HEADERS, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(packages=[("havoc_core", "static")]), name="static")
    return app


@dataclass(frozen=True)
class _Shape:
    """Where the two endpoints' JSON differs: chat carries messages and deltas, completions text."""

    prefix: str
    object: str
    chunk_object: str
    chat: bool


CHAT = _Shape("chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)
COMPLETION = _Shape("cmpl", "text_completion", "text_completion", chat=False)


@dataclass
class _Reply:
    """OpenAI response bodies for one request: the whole answer, or stream chunks."""

    shape: _Shape
    id: str
    model: str
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))

    def whole(self, done: Done) -> dict[str, Any]:
        c = done.completion
        body = {"message": {"role": "assistant", "content": c.text}} if self.shape.chat else {"text": c.text}
        return self._envelope(self.shape.object, body, c.finish_reason, self.usage(done))

    def chunk(self, text: str = "", reason: str | None = None, opening: bool = False) -> dict[str, Any]:
        if self.shape.chat:
            delta = {"role": "assistant", "content": ""} if opening else {"content": text} if text else {}
            return self._envelope(self.shape.chunk_object, {"delta": delta}, reason)
        return self._envelope(self.shape.chunk_object, {"text": text}, reason)

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        return {**self._envelope(self.shape.chunk_object, None, None, self.usage(done)), "choices": []}

    def usage(self, done: Done) -> dict[str, Any]:
        n = len(done.completion.ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": done.cached}}

    def _envelope(self, obj: str, choice: dict[str, Any] | None, reason: str | None,
                  usage: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                                "system_fingerprint": None}
        if choice is not None:
            body["choices"] = [{"index": 0, **choice, "logprobs": None, "finish_reason": reason}]
        if usage is not None:
            body["usage"] = usage
        return body


async def _sse(stream: AsyncIterator[str | Done], reply: _Reply, usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ``data: [DONE]`` last. When the client
    disconnects Starlette cancels this generator, and closing ``stream`` stops the request."""
    def event(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        try:
            if reply.shape.chat:
                yield event(reply.chunk(opening=True))
            async for item in stream:
                if isinstance(item, str):
                    yield event(reply.chunk(item))
                else:
                    yield event(reply.chunk(reason=item.completion.finish_reason))
                    if usage:
                        yield event(reply.usage_chunk(item))
        except ApiError as e:
            yield event(e.body())
    yield "data: [DONE]\n\n"


async def _until_done_or_gone(stream: AsyncIterator[str | Done], request: Request) -> Done | None:
    """The request's ``Done``, or None if the client disconnected first (the request is then stopped)."""
    async def finish() -> Done:
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for item in stream:
                if isinstance(item, Done):
                    return item
        raise AssertionError("generation ended without a result")

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(finish()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    return work.result() if work.done() and not work.cancelled() else None


# --------------------------------------------------------------------------- the command

def model_id(path: Path) -> str:
    """``run/checkpoint_step_N`` for a checkpoint in a run dir, else the directory's name."""
    return f"{path.parent.name}/{path.name}" if path.name.startswith("checkpoint_step_") else path.name


def serving_threads(requested: int | None = None) -> int:
    """Torch threads for the engine: ``requested``, else $OMP_NUM_THREADS, else one per core but one.
    The event loop and the engine share the machine: with every core in torch's pool, each decode
    step's parallel regions wait for a thread the event loop has preempted (2 cores here: 8 clients
    got 660-720 tokens/s with 2 threads vs 940-980 with 1, docs/LOG.md)."""
    if requested:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one), so the printed address is the real one. Its proto
    is IPPROTO_TCP, not 0 (``socket.create_server``): asyncio turns Nagle's algorithm off only for
    such connections, and with it on every keep-alive response waits ~40 ms for a delayed ACK."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise HavocError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def serve(checkpoint: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, model_name: str | None = None, max_batch: int = 32, device: str = "auto",
          dtype: str = "auto", quantize: Quantize | None = None, threads: int | None = None,
          pack: bool | None = None) -> int:
    """Load a checkpoint and serve it until Ctrl-C (or SIGTERM); exit status 0."""
    import uvicorn

    from havoc_core.chat import load
    from havoc_core.config import format_params

    if max_batch < 1:
        raise HavocError(f"--max-batch: expected an integer >= 1, found {max_batch}")
    if threads is not None and threads < 1:
        raise HavocError(f"--threads: expected an integer >= 1, found {threads}")
    torch.set_num_threads(serving_threads(threads))
    loaded = load(checkpoint, device=device, dtype=dtype, quantize=quantize)
    name = model_name or model_id(loaded.path)
    app = create_app(loaded.model, loaded.tokenizer, model_name=name, api_key=api_key or None, max_batch=max_batch,
                     pack=pack)
    sock = listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    n = torch.get_num_threads()
    packed = is_packed(loaded.model)
    print(f"serving {name} ({format_params(loaded.n_params)} parameters, {max_batch} slots, {n} torch "
          f"thread{'s' * (n > 1)}{', prepacked weights' * packed}) at "
          f"http://{shown}:{sock.getsockname()[1]}  (chat page at /, OpenAI API at /v1)", flush=True)
    if not is_loopback(host) and not api_key:
        print("warning: listening beyond this machine without --api-key: anyone who can reach it can use it",
              flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn shuts down cleanly, then re-raises Ctrl-C
        server.run(sockets=[sock])
    return 0
