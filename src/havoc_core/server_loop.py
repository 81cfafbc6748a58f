"""The thread that owns the model in ``havoc serve``: continuous batching over one ``Engine``.

``EngineLoop`` admits queued requests into free slots between two decode steps (the slot whose
cache holds the longest prefix of the prompt, so a conversation's next turn prefills only its new
tokens), runs one batched decode step for all running requests, and hands each request its text
deltas and, at the end, a ``Done``; a request whose client left is stopped at the next step. The
asyncio side only puts requests in and awaits what comes back: it never waits on the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from havoc_core.engine import Completion, Engine, TokenLogprob
from havoc_core.openai_api import ApiError
from havoc_core.sampling import SamplingParams

if TYPE_CHECKING:
    from havoc_core.serve_metrics import ServerMetrics


@dataclass
class Done:
    """The end of a request: the engine's ``Completion`` and how many prompt tokens its slot's
    cache already held (reported as ``usage.prompt_tokens_details.cached_tokens``)."""

    completion: Completion
    cached: int
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when the job asked for them


@dataclass
class Piece:
    """A text delta with the logprob of the token that produced it (requests that ask for logprobs)."""

    text: str
    logprob: TokenLogprob


@dataclass
class Job:
    """One sample to generate: ``params`` None scores the prompt only (``prompt_logprobs`` alternatives)."""

    ids: list[int]
    params: SamplingParams | None
    prompt_logprobs: int | None = None


Item = str | Piece | Done


@dataclass
class _Request:
    """One job as the engine thread sees it; results go back through ``out``, tagged with ``index``."""

    job: Job
    index: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[tuple[int, Item | ApiError]]
    cancelled: bool = False  # set by the event loop when the client is gone
    cached: int = 0  # prompt tokens found in the slot's cache (not prefilled again)
    scored: list[TokenLogprob | None] | None = None
    queued: float = field(default_factory=time.perf_counter)
    last_token: float | None = None  # when its latest token came out (latency metrics)

    @property
    def ids(self) -> list[int]:
        return self.job.ids


def _deliver(items: list[tuple[_Request, Item | ApiError]]) -> None:
    for request, item in items:
        request.out.put_nowait((request.index, item))


class EngineLoop:
    """The thread that owns an ``Engine``: admits queued requests into free slots (the slot whose
    cache holds the longest prefix of the prompt), runs one batched decode step for all running
    requests, and hands each request its text deltas and, at the end, a ``Done``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.metrics: ServerMetrics | None = None  # set by the app that serves /metrics
        self._inbox: queue.Queue[list[_Request] | None] = queue.Queue()
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}
        self._thread = threading.Thread(target=self._loop, name="havoc-engine", daemon=True)
        self._outbox: list[tuple[_Request, Item | ApiError]] = []
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

    async def generate(self, ids: list[int], params: SamplingParams) -> AsyncIterator[str | Piece | Done]:
        """Text deltas, then ``Done``. Leaving early (client gone) stops the request."""
        async with contextlib.aclosing(self.generate_many([Job(ids, params)])) as items:  # type: ignore[type-var]
            async for _, item in items:
                yield item

    async def generate_many(self, jobs: list[Job]) -> AsyncIterator[tuple[int, Item]]:
        """(job index, item) for every job, interleaved as they come: text deltas (``Piece`` when the
        job asked for logprobs), then one ``Done`` per job. The jobs reach the engine thread
        together, so samples of one prompt are admitted (and prefilled) together. Leaving early
        (client gone) stops them all."""
        if not self.alive():
            raise ApiError(503, "the server is shutting down", kind="server_error")
        out: asyncio.Queue[tuple[int, Item | ApiError]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        requests = [_Request(job, i, loop, out) for i, job in enumerate(jobs)]
        self._inbox.put(requests)
        left = len(requests)
        try:
            while left:
                index, item = await out.get()
                if isinstance(item, ApiError):
                    raise item
                yield index, item
                left -= isinstance(item, Done)
        finally:
            for request in requests:  # no effect once finished; otherwise frees the slot at the next step
                request.cancelled = True

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

    def _send(self, request: _Request, item: Item | ApiError) -> None:
        self._outbox.append((request, item))

    def _flush(self) -> None:
        """Hand this step's output to the event loop(s) in one wake-up each, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Item | ApiError]]] = {}
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
                self._waiting.extend(item)
                item = self._inbox.get_nowait()
            return False
        except queue.Empty:
            return True

    def _admit(self) -> None:
        """Move waiting requests into free slots; those admitted together share prefill passes."""
        self._score_only()
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
            for _, request in batch:
                if request.job.prompt_logprobs is not None:
                    request.scored = self.engine.score(request.ids, request.job.prompt_logprobs)
            self.engine.add_batch([(r.ids, r.job.params, slot) for slot, r in batch])
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
        now = time.perf_counter()
        for event in events:
            request = self._running[event.slot]
            if self.metrics is not None:
                self.metrics.token(now - (request.last_token or request.queued), first=request.last_token is None)
                request.last_token = now
            if event.logprob is not None:
                self._send(request, Piece(event.text, event.logprob))
            elif event.text:
                self._send(request, event.text)
            if event.finish_reason is not None:
                done = Done(self.engine.result(event.slot), request.cached, request.scored)
                self._send(request, done)
                del self._running[event.slot]
                self._finished(done)

    def _finished(self, done: Done) -> None:
        self.counts["completed"] += 1
        if self.metrics is not None:
            self.metrics.finished(done.completion.prompt_tokens, len(done.completion.ids))

    def _score_only(self) -> None:
        """Answer the waiting jobs that only score their prompt (no slot needed), in arrival order."""
        rest: deque[_Request] = deque()
        for request in self._waiting:
            if request.job.params is not None:
                rest.append(request)
            elif request.cancelled:
                self.counts["aborted"] += 1
            else:
                try:
                    scored = self.engine.score(request.ids, request.job.prompt_logprobs or 0)
                except Exception as e:  # validated before queueing, so this is a server fault
                    self.counts["failed"] += 1
                    self._send(request, ApiError(500, f"scoring failed: {e}", kind="server_error"))
                    continue
                done = Done(Completion(len(request.ids), [], "", "length", []), 0, scored)
                self._send(request, done)
                self._finished(done)
        self._waiting = rest
