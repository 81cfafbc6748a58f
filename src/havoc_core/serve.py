"""OpenAI-compatible HTTP server with continuous batching, and a web chat page (``havoc serve``).

One thread owns the model (``server_loop.EngineLoop``, continuous batching); the asyncio event loop
only parses (``openai_api``), tokenises (in a worker thread), awaits text deltas and writes JSON /
SSE; it never waits on the model. Prompts use the one chat format (``tokenizer.render_chat``).

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming SSE or not),
``GET /v1/models``, ``GET /health``, and the chat page at ``/`` (static files, no external assets).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles

from havoc_core.checkpoint import step_of
from havoc_core.config import format_params
from havoc_core.engine import Engine
from havoc_core.errors import HavocError
from havoc_core.inference import is_packed, load
from havoc_core.openai_api import (
    CHAT,
    COMPLETION,
    ApiError,
    ChatRequest,
    CompletionRequest,
    Reply,
    Sampling,
    Shape,
    parse_body,
)
from havoc_core.precision import Quantize
from havoc_core.sampling import SamplingError, SamplingParams
from havoc_core.server_loop import Done, EngineLoop
from havoc_core.tokenizer import render_chat

MAX_BODY_BYTES = 1 << 20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
PAGE_HEADERS = {  # the chat page loads nothing from elsewhere and runs no inline script
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


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
               max_batch: int = 32, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The ASGI app for one prepared model (``inference.load``); its engine thread runs while the
    app does (lifespan)."""
    runner = EngineLoop(Engine(model, tokenizer, max_batch=max_batch))
    context = model.config.max_seq_len
    created = int(time.time())
    chat_stop_ids = tokenizer.turn_stop_ids()

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

    def sampling(req: Sampling, ids: list[int], max_tokens: int | None, default: int | None,
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
        except SamplingError as e:
            raise ApiError(400, str(e), e.field) from None
        return _Prepared(ids, params)

    def prepare_chat(req: ChatRequest) -> _Prepared:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in req.messages]
        ids = render_chat(tokenizer, messages, add_generation_prompt=True)[0]
        return sampling(req, ids, req.max_completion_tokens or req.max_tokens, None, "messages", chat_stop_ids)

    def prepare_completion(req: CompletionRequest) -> _Prepared:
        ids = [tokenizer.bos_id, *tokenizer.encode(req.prompt)]
        return sampling(req, ids, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt", [])

    async def handle(request: Request, cls: type[Sampling], prepare: Callable[[Any], _Prepared],
                     shape: Shape) -> Response:
        req = parse_body(cls, await _read_body(request, max_body_bytes))
        check_model(req.model)
        job = await asyncio.to_thread(prepare, req)  # tokenising a long prompt must not stall the loop
        reply = Reply(shape, f"{shape.prefix}-{uuid.uuid4().hex}", model_name, len(job.ids))
        stream = runner.generate(job.ids, job.params)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_sse(stream, reply, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        done = await _until_done_or_gone(stream, request)
        if done is None:
            return Response(status_code=499)  # the client left; nobody reads this
        return JSONResponse(reply.whole(done.completion, done.cached))

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


async def _sse(stream: AsyncIterator[str | Done], reply: Reply, usage: bool) -> AsyncIterator[str]:
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
                        yield event(reply.usage_chunk(item.completion, item.cached))
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
    return f"{path.parent.name}/{path.name}" if step_of(path) is not None else path.name


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
    if max_batch < 1:
        raise HavocError(f"--max-batch: expected an integer >= 1, found {max_batch}")
    if threads is not None and threads < 1:
        raise HavocError(f"--threads: expected an integer >= 1, found {threads}")
    torch.set_num_threads(serving_threads(threads))
    loaded = load(checkpoint, device=device, dtype=dtype, quantize=quantize, batching=max_batch > 1, pack=pack)
    name = model_name or model_id(loaded.path)
    app = create_app(loaded.model, loaded.tokenizer, model_name=name, api_key=api_key or None, max_batch=max_batch)
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
