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
from havoc_core.inference import load
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
from havoc_core.openai_jobs import Plan, Planner
from havoc_core.openai_responses import Responder, ResponsesRequest, chat_request, renamed
from havoc_core.precision import Quantize
from havoc_core.serve_metrics import CONTENT_TYPE, ServerMetrics, StatusCounter
from havoc_core.server_loop import Done, EngineLoop, Item, Piece

MAX_BODY_BYTES = 1 << 20
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

def create_app(model: Any, tokenizer: Any, *, model_name: str = "havoc", api_key: str | None = None,
               max_batch: int = 32, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The ASGI app for one prepared model (``inference.load``); its engine thread runs while the
    app does (lifespan)."""
    engine = Engine(model, tokenizer, max_batch=max_batch)
    runner = EngineLoop(engine)
    runner.metrics = metrics = ServerMetrics(model_name, runner.stats)  # its gauges read the loop's stats
    context = model.config.max_seq_len
    created = int(time.time())
    planner = Planner(tokenizer, context, model.config.vocab_size, engine.grammars)

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

    async def handle(request: Request, cls: type[Sampling], plan_of: Callable[[Any], Plan],
                     shape: Shape) -> Response:
        req = parse_body(cls, await _read_body(request, max_body_bytes))
        check_model(req.model)
        plan = await asyncio.to_thread(plan_of, req)  # tokenising a long prompt must not stall the loop
        reply = Reply(shape, f"{shape.prefix}-{uuid.uuid4().hex}", model_name, plan.prompt_tokens)
        stream = runner.generate_many(plan.jobs)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_sse(stream, reply, plan, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        dones = await _until_done_or_gone(stream, request, len(plan.jobs))
        if dones is None:
            return Response(status_code=499)  # the client left; nobody reads this
        choices = [plan.choice(i, d) for i, d in enumerate(dones)]
        return JSONResponse(reply.whole(choices, [d.completion for d in dones], sum(d.cached for d in dones)))

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request) -> Response:
        return await handle(request, ChatRequest, planner.chat, CHAT)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request) -> Response:
        return await handle(request, CompletionRequest, planner.completion, COMPLETION)

    @app.post("/v1/responses", dependencies=[Depends(check_key)])
    async def responses(request: Request) -> Response:
        req = parse_body(ResponsesRequest, await _read_body(request, max_body_bytes))
        check_model(req.model)
        try:
            plan = await asyncio.to_thread(planner.chat, chat_request(req))
        except ApiError as e:
            raise renamed(e) from None
        responder = Responder(req, plan.prompt_tokens)
        stream = runner.generate_many(plan.jobs)
        if req.stream:
            return StreamingResponse(responder.events(stream), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        dones = await _until_done_or_gone(stream, request, 1)
        return Response(status_code=499) if dones is None else JSONResponse(responder.response(dones[0]))

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(check_key)])
    async def model_info(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    app.add_middleware(StatusCounter, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:  # no key needed, like /health: scrapers rarely carry one
        return Response(metrics.text(), media_type=CONTENT_TYPE)

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


async def _sse(stream: AsyncIterator[tuple[int, Item]], reply: Reply, plan: Plan, usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format (each choice's chunks carry its ``index``),
    ``data: [DONE]`` last. When the client disconnects Starlette cancels this generator, and
    closing ``stream`` stops the request."""
    def event(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    sent = [len(plan.echo[i]) if plan.echo else 0 for i in range(len(plan.jobs))]  # characters per choice
    dones: list[Done] = []
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        try:
            for i in range(len(plan.jobs)):
                if reply.shape.chat:
                    yield event(reply.chunk(i, opening=True))
                elif plan.echo:
                    yield event(reply.chunk(i, plan.echo[i]))
            async for index, item in stream:
                if isinstance(item, Done) and plan.tool_call:  # a call is sent whole, once it parses
                    dones.append(item)
                    body, reason = plan.choice(index, item)
                    message = body["message"]
                    delta = ({"tool_calls": [{"index": 0, **message["tool_calls"][0]}]} if reason == "tool_calls"
                             else {"content": message["content"]})
                    yield event(reply.chunk(index, delta=delta))
                    yield event(reply.chunk(index, reason=reason))
                elif isinstance(item, Done):
                    dones.append(item)
                    yield event(reply.chunk(index, reason=item.completion.finish_reason))
                elif plan.tool_call:
                    continue
                elif isinstance(item, Piece):
                    yield event(reply.chunk(index, item.text, logprobs=plan.piece(item, sent[index])))
                    sent[index] += len(item.text)
                else:
                    yield event(reply.chunk(index, item))
            if usage:
                yield event(reply.usage_chunk([d.completion for d in dones], sum(d.cached for d in dones)))
        except ApiError as e:
            yield event(e.body())
    yield "data: [DONE]\n\n"


async def _until_done_or_gone(stream: AsyncIterator[tuple[int, Item]], request: Request, n: int) -> list[Done] | None:
    """Every job's ``Done`` (in job order), or None if the client disconnected first (the jobs are then stopped)."""
    async def finish() -> list[Done]:
        dones: dict[int, Done] = {}
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for index, item in stream:
                if isinstance(item, Done):
                    dones[index] = item
        if len(dones) != n:
            raise AssertionError("generation ended without a result")
        return [dones[i] for i in range(n)]

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
    print(f"serving {name} ({format_params(loaded.n_params)} parameters, {max_batch} slots, {n} torch "
          f"thread{'s' * (n > 1)}, {loaded.plan.describe()}) at "
          f"http://{shown}:{sock.getsockname()[1]}  (chat page at /, OpenAI API at /v1)", flush=True)
    if not is_loopback(host) and not api_key:
        print("warning: listening beyond this machine without --api-key: anyone who can reach it can use it",
              flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn shuts down cleanly, then re-raises Ctrl-C
        server.run(sockets=[sock])
    return 0
