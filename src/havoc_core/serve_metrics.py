"""``GET /metrics`` of ``havoc serve``: Prometheus text format via ``prometheus_client``, with the
series vLLM's dashboards read (under ``havoc_`` names): requests by endpoint and status, prompt and
generated tokens, running and waiting requests, time to first token and time per output token.

Each app has its own registry (two servers in one process keep separate counts). Token counts and
latencies are recorded by the engine thread as tokens come out; statuses by the HTTP layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: from a few ms (a tiny model's step) to a long prefill of a 2B model on CPU
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        r = self.registry
        self.requests = Counter("havoc_requests", "HTTP requests to the API by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("havoc_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("havoc_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("havoc_time_to_first_token_seconds", "From queueing to the first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("havoc_time_per_output_token_seconds", "Between two tokens of one request",
                              buckets=TPOT_BUCKETS, registry=r)
        running = Gauge("havoc_requests_running", "Requests being decoded", list(labels), registry=r)
        waiting = Gauge("havoc_requests_waiting", "Requests queued for a slot", list(labels), registry=r)
        running.labels(**labels).set_function(lambda: stats()["running"])
        waiting.labels(**labels).set_function(lambda: stats()["waiting"])

    def token(self, since: float, first: bool) -> None:
        """A request's token came out ``since`` seconds after it was queued (``first``) or after its last one."""
        (self.ttft if first else self.tpot).observe(since)

    def finished(self, prompt_tokens: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class StatusCounter:
    """ASGI middleware counting every ``/v1/`` response by path and status (errors included: it
    reads the status line as it is sent, after FastAPI's own handlers have run)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint=scope["path"], status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
