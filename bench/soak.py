"""A bounded soak of ``havoc serve`` on loopback (issue 16, item 4): many concurrent streaming
clients for a fixed time, a third of them hanging up mid-stream, malformed requests in between;
then a sample of the finished requests replayed alone, one at a time.

The server is the real CLI in its own process (``havoc serve --port 0``) on a tiny random-weight
model. Every request carries its own seed (its index) and a temperature above 0, so its tokens
depend on the seed and must not depend on what else shared its batch. Required (exit 1 if not):
- every replayed request's text equals its text under load (a disconnected one's: a prefix of it);
- every malformed request gets a 4xx; no 5xx anywhere (client side, in a stream, or in /metrics);
- ``/health`` shows 0 running and 0 waiting once the load drains (no leaked slot);
- the server's resident memory (VmRSS) grows under 5% from the start of the load to its end. The
  start follows a warm-up of the same load (default 60 s): oneDNN's and ideep's caches of
  per-shape kernels (LRU, 1,024 entries each) fill as new batch shapes come, here for about a
  minute (+~130 MB on havoc-tiny's ~120 MB of allocations; flat with LRU_CACHE_CAPACITY=1
  ONEDNN_PRIMITIVE_CACHE_CAPACITY=0), and a leak is what grows after that.

    python bench/soak.py                              # 64 clients x 120 s on a tiny model
    python bench/soak.py --clients 8 --seconds 10     # a quick look
    python bench/soak.py --checkpoint DIR             # any checkpoint
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

MODEL = "soak"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MALFORMED_SHARE = 0.15  # of all requests
DISCONNECT_SHARE = 1 / 3  # of the well-formed ones
RSS_GROWTH_LIMIT_PCT = 5.0
PROMPTS = ["What does the import statement do?", "Explain the with statement.", "How do I write a class?",
           "The for loop iterates over", "Tell me about exceptions.", "A list comprehension is",
           "What is a generator?", "Describe the global statement."]
GOOD = {"model": MODEL, "prompt": "x", "max_tokens": 4}
# (what, path, raw body, content type): each must be answered with a 4xx
MALFORMED: list[tuple[str, str, bytes, str]] = [
    ("truncated JSON", CHAT, b'{"model": "soak", "messages": [{"role": "user", "content": "hi"', "application/json"),
    ("not an object", COMPLETIONS, b"[1, 2, 3]", "application/json"),
    ("empty body", COMPLETIONS, b"", "application/json"),
    ("invalid UTF-8", CHAT, b'{"model": "soak", "messages": "\xff\xfe"}', "application/json"),
    ("form-encoded", COMPLETIONS, b"model=soak&prompt=x", "application/x-www-form-urlencoded"),
    ("temperature a string", COMPLETIONS, json.dumps({**GOOD, "temperature": "hot"}).encode(), "application/json"),
    ("messages a string", CHAT, json.dumps({"model": MODEL, "messages": "hi"}).encode(), "application/json"),
    ("max_tokens a string", COMPLETIONS, json.dumps({**GOOD, "max_tokens": "16"}).encode(), "application/json"),
    ("stream a string", COMPLETIONS, json.dumps({**GOOD, "stream": "yes"}).encode(), "application/json"),
    ("max_tokens 1e30", COMPLETIONS, json.dumps({**GOOD, "max_tokens": 10**30}).encode(), "application/json"),
    ("max_tokens past the context", CHAT, json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}).encode(),
     "application/json"),
    ("seed 2**70", COMPLETIONS, json.dumps({**GOOD, "seed": 2**70, "stream": True}).encode(), "application/json"),
    ("n 1e12", COMPLETIONS, json.dumps({**GOOD, "n": 10**12}).encode(), "application/json"),
    ("temperature 1e999", COMPLETIONS, b'{"model": "soak", "prompt": "x", "temperature": 1e999}', "application/json"),
    ("temperature NaN", CHAT, b'{"model": "soak", "messages": [{"role": "user", "content": "hi"}], '
                              b'"temperature": NaN}', "application/json"),
    ("token id out of range", COMPLETIONS, json.dumps({**GOOD, "prompt": [10**15]}).encode(), "application/json"),
    ("logit_bias key huge", COMPLETIONS, json.dumps({**GOOD, "logit_bias": {str(10**20): 1}}).encode(),
     "application/json"),
    ("unknown field", CHAT, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                        "temprature": 1}).encode(), "application/json"),
    ("unknown model", COMPLETIONS, json.dumps({**GOOD, "model": "nope", "stream": True}).encode(), "application/json"),
    ("unknown role", CHAT, json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}).encode(),
     "application/json"),
    ("100,000-deep nesting", COMPLETIONS, b'{"model": "soak", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "application/json"),
    ("over the 1 MiB body limit", CHAT, b'{"model": "soak", "messages": [{"role": "user", "content": "'
     + b"x" * (1 << 20) + b'"}]}', "application/json"),
]


@dataclass
class Outcome:
    """What one request got back."""

    index: int
    kind: str  # completed, disconnected, malformed, error
    path: str = ""
    body: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    status: int = 0
    detail: str = ""


# --------------------------------------------------------------------------- the server

def make_checkpoint(out: Path) -> Path:
    """The tests' tiny model (tests/conftest.py ``tiny_config``: 2 layers, 64 wide, GQA, a large
    init scale for varied tokens) with a 256-token context and their 1,024-token BPE tokenizer
    trained on the pydoc topics. Random weights, seed 0."""
    from pydoc_data.topics import topics

    import torch

    from havoc_core import AttentionConfig, HavocConfig, HavocModel, MLPConfig
    from havoc_core.checkpoint import save_model
    from havoc_core.tokenizer import HavocTokenizer

    tok = HavocTokenizer.train([topics[k] for k in sorted(topics)], vocab_size=1024, show_progress=False)
    cfg = HavocConfig(vocab_size=1024, d_model=64, num_layers=2, max_seq_len=256, initializer_range=0.3,
                      attention=AttentionConfig(num_heads=4, num_kv_heads=2), mlp=MLPConfig(hidden_dim=128))
    torch.manual_seed(0)
    return save_model(out, HavocModel(cfg).eval(), tokenizer=tok)


@contextlib.contextmanager
def running_server(checkpoint: Path, max_batch: int, log: Path, extra: list[str]) -> Iterator[tuple[int, str]]:
    """(pid, url) of ``havoc serve`` on 127.0.0.1 and a free port. Its output goes to ``log``, not a
    pipe: uvicorn's access log of thousands of requests would fill a pipe nobody reads and block
    the server. Stopped with SIGINT (killed if it takes over 30 s) whatever happens."""
    cmd = [sys.executable, "-m", "havoc_core.cli", "serve", str(checkpoint), "--host", "127.0.0.1", "--port", "0",
           "--max-batch", str(max_batch), "--model-name", MODEL, *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        url, deadline = None, time.monotonic() + 180
        while url is None:
            banner = [line for line in log.read_text().split("\n") if line.startswith("serving ") and "http://" in line]
            if banner:  # "serving soak (...) at http://127.0.0.1:PORT  (chat page at /, ...)"
                url = "http://" + banner[0].split("http://")[1].split()[0]
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"havoc serve did not start: {log.read_text()[-2000:]}")
            else:
                time.sleep(0.1)
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"havoc serve did not answer /health: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield proc.pid, url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc/PID/status (VmRSS, in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def wait_idle(url: str, timeout: float = 30) -> dict[str, Any]:
    """``/health`` once nothing runs or waits, or as it stands after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/health", timeout=10).json()
        if (health["running"] == 0 and health["waiting"] == 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def server_5xx(url: str) -> int:
    """5xx responses the server itself counted (``havoc_requests_total`` in /metrics): also those a
    client never saw, e.g. after it hung up."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("havoc_requests_total{") and 'status="5' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


# --------------------------------------------------------------------------- the clients

def well_formed(index: int, rng: random.Random) -> tuple[str, dict[str, Any]]:
    """A streaming request seeded with its index; half chat, half completions; half ``ignore_eos``."""
    body: dict[str, Any] = {"model": MODEL, "max_tokens": rng.randint(16, 32), "seed": index, "stream": True,
                            "temperature": rng.choice([0.7, 1.0, 1.3]), "top_p": rng.choice([0.9, 1.0]),
                            "stream_options": {"include_usage": True}, "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.5:
        return CHAT, {**body, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}
    return COMPLETIONS, {**body, "prompt": rng.choice(PROMPTS)}


async def stream(http: httpx.AsyncClient, index: int, path: str, body: dict[str, Any],
                 hang_up_after: int | None) -> Outcome:
    """Stream one request to its end (``completed``), or hang up after ``hang_up_after`` text
    chunks (``disconnected``: leaving the ``async with`` closes the connection mid-stream).
    Lines are split at "\n" only, as SSE does: httpx's ``aiter_lines`` also splits at U+0085,
    U+2028 and U+2029, which JSON leaves as they are inside generated text."""
    t0, tokens, rest = time.perf_counter(), 0, ""
    pieces: list[str] = []
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return Outcome(index, "error", path, body, status=r.status_code, detail=r.text[:300])
        async for text in r.aiter_text():
            *lines, rest = (rest + text).split("\n")
            for line in lines:
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return Outcome(index, "completed", path, body, "".join(pieces), tokens, time.perf_counter() - t0)
                chunk = json.loads(line[6:])
                if "error" in chunk:  # an error after the 200 was sent: its own status is in the body
                    status = 500 if chunk["error"].get("type") == "server_error" else 400
                    return Outcome(index, "error", path, body, status=status, detail=line[:300])
                for choice in chunk["choices"]:
                    piece = choice["delta"].get("content") if path == CHAT else choice["text"]
                    if piece:
                        pieces.append(piece)
                tokens = chunk["usage"]["completion_tokens"] if chunk.get("usage") else len(pieces)
                if hang_up_after is not None and len(pieces) >= hang_up_after:
                    return Outcome(index, "disconnected", path, body, "".join(pieces), len(pieces),
                                   time.perf_counter() - t0)
    return Outcome(index, "error", path, body, status=200, detail="the stream ended without [DONE]")


async def malformed(http: httpx.AsyncClient, index: int, rng: random.Random) -> Outcome:
    what, path, content, kind = rng.choice(MALFORMED)
    r = await http.post(path, content=content, headers={"content-type": kind})
    ok = 400 <= r.status_code < 500
    return Outcome(index, "malformed" if ok else "error", path, status=r.status_code, detail=f"{what}: {r.text[:300]}")


async def load(url: str, clients: int, seconds: float, seed: int, first_index: int) -> list[Outcome]:
    """``clients`` clients, each sending request after request until ``seconds`` have passed (the
    last ones are let finish). Request ``i`` is drawn from ``Random(seed, i)``: malformed or
    well-formed, and if well-formed whether and after how many chunks its client hangs up."""
    counter = itertools.count(first_index)
    outcomes: list[Outcome] = []
    stop = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            index = next(counter)
            rng = random.Random(seed * 1_000_003 + index)
            try:
                if rng.random() < MALFORMED_SHARE:
                    outcomes.append(await malformed(http, index, rng))
                    continue
                path, body = well_formed(index, rng)
                hang_up = rng.randint(1, body["max_tokens"] - 1) if rng.random() < DISCONNECT_SHARE else None
                outcomes.append(await stream(http, index, path, body, hang_up))
            except (httpx.HTTPError, ValueError, KeyError) as e:  # a timeout, a dropped connection, a bad chunk
                outcomes.append(Outcome(index, "error", detail=f"{e.__class__.__name__}: {e}"))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, connect=10), limits=limits) as http:
        async with asyncio.timeout(seconds + 180):  # every request bounded above; this bounds them all
            await asyncio.gather(*(client(http) for _ in range(clients)))
    return outcomes


async def replay(url: str, outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """Send each request again alone (one at a time) and report those whose text differs from what
    it got under load (a disconnected request's text must be a prefix of its solo text)."""
    wrong = []
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, connect=10)) as http, \
            asyncio.timeout(60 + 5 * len(outcomes)):  # ~0.1 s each here: a hang fails, it is not waited out
        for o in outcomes:
            solo = await stream(http, o.index, o.path, o.body, None)
            same = solo.text == o.text if o.kind == "completed" else solo.text.startswith(o.text)
            if solo.kind != "completed" or not same:
                wrong.append({"index": o.index, "kind": o.kind, "under_load": o.text, "solo": solo.text,
                              "solo_status": solo.status, "detail": solo.detail})
    return wrong


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else sum(values)


# --------------------------------------------------------------------------- the soak

def soak(checkpoint: Path, *, clients: int = 64, seconds: float = 120, warmup: float = 60, replays: int = 256,
         max_batch: int = 32, seed: int = 16, rss_limit_pct: float = RSS_GROWTH_LIMIT_PCT,
         server_args: list[str] | None = None) -> dict[str, Any]:
    """Run the soak against a fresh ``havoc serve`` of ``checkpoint``; the summary's ``failures``
    lists every requirement not met (empty: all met). A short run may pass a looser
    ``rss_limit_pct``: its warm-up is too short to fill the kernel caches (see the module doc)."""
    with tempfile.TemporaryDirectory() as tmp, \
            running_server(checkpoint, max_batch, Path(tmp) / "serve.log", server_args or []) as (pid, url):
        warm = asyncio.run(load(url, clients, warmup, seed, first_index=10**9))  # caches fill (module doc)
        wait_idle(url)
        rss_start = rss_bytes(pid)
        trace: list[float] = []  # resident MiB through the load, ten samples: a leak climbs, churn plateaus
        done = threading.Event()
        sampler = threading.Thread(target=lambda: [trace.append(round(rss_bytes(pid) / 2**20, 1))
                                                   for _ in iter(lambda: done.wait(seconds / 10), True)], daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        try:
            outcomes = asyncio.run(load(url, clients, seconds, seed, first_index=0))
        finally:
            done.set()
            sampler.join(timeout=10)
        wall = time.perf_counter() - t0
        health = wait_idle(url)
        rss_end = rss_bytes(pid)
        by_kind = {k: [o for o in outcomes if o.kind == k] for k in ("completed", "disconnected", "malformed", "error")}
        rng = random.Random(seed)
        sample = (rng.sample(by_kind["completed"], min(replays, len(by_kind["completed"])))
                  + rng.sample(by_kind["disconnected"], min(replays // 4, len(by_kind["disconnected"]))))
        mismatches = asyncio.run(replay(url, sorted(sample, key=lambda o: o.index)))
        fivexx = server_5xx(url)
    errors = by_kind["error"] + [o for o in warm if o.kind == "error"]
    latencies = [o.seconds for o in by_kind["completed"]]
    growth = 100 * (rss_end - rss_start) / rss_start
    summary: dict[str, Any] = {
        "clients": clients, "seconds": round(wall, 1), "max_batch": max_batch,
        "requests": len(outcomes), "completed": len(by_kind["completed"]),
        "disconnected": len(by_kind["disconnected"]), "malformed": len(by_kind["malformed"]), "errors": len(errors),
        "tokens": (tokens := sum(o.tokens for o in outcomes)), "tokens_per_s": round(tokens / wall, 1),
        "latency_p50_s": round(percentile(latencies, 50), 3), "latency_p99_s": round(percentile(latencies, 99), 3),
        "rss_start_mb": round(rss_start / 2**20, 1), "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth_pct": round(growth, 2), "rss_during_load_mb": trace,
        "replayed": len(sample), "mismatches": len(mismatches),
        "status_5xx": sum(o.status >= 500 for o in errors), "server_5xx": fivexx,
        "running_at_end": health["running"], "waiting_at_end": health["waiting"],
        "server_requests": health["requests"],
    }
    failures = []
    if errors:
        failures.append(f"{len(errors)} requests failed, e.g. {[(o.status, o.detail) for o in errors[:3]]}")
    if summary["status_5xx"] or fivexx:
        failures.append(f"5xx: {summary['status_5xx']} seen by clients, {fivexx} counted by the server")
    if mismatches:
        failures.append(f"{len(mismatches)} of {len(sample)} replayed requests differ alone, e.g. {mismatches[:2]}")
    if health["running"] or health["waiting"]:
        failures.append(f"/health after the load drained: {health['running']} running, {health['waiting']} waiting")
    if health["requests"]["failed"]:
        failures.append(f"the engine failed {health['requests']['failed']} requests")
    if growth >= rss_limit_pct:
        failures.append(f"resident memory grew {growth:.1f}% (limit {rss_limit_pct}%)")
    if not (by_kind["completed"] and by_kind["disconnected"] and by_kind["malformed"]):
        failures.append("the load did not exercise completed, disconnected and malformed requests alike")
    summary["failures"] = failures
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="serve this checkpoint (default: a tiny random-weight model made here)")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    p.add_argument("--seconds", type=float, default=120, help="how long the load lasts")
    p.add_argument("--warmup", type=float, default=60, help="seconds of the same load before memory is measured")
    p.add_argument("--replays", type=int, default=256,
                   help="finished requests replayed alone (and a quarter as many disconnected ones)")
    p.add_argument("--max-batch", type=int, default=32, help="the server's slots")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--server-args", default="", help="extra `havoc serve` flags, e.g. --server-args='--threads 1'")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(Path(tmp) / "ckpt")
        summary = soak(ckpt, clients=args.clients, seconds=args.seconds, warmup=args.warmup, replays=args.replays,
                       max_batch=args.max_batch, seed=args.seed, server_args=args.server_args.split())
    print(json.dumps(summary, indent=2))
    sys.exit(1 if summary["failures"] else 0)


if __name__ == "__main__":
    main()
