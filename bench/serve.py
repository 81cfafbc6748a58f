"""Serving throughput: total generated tokens/s of ``havoc serve`` with 1, 8 and 32 concurrent
streaming clients, against the same requests sent one after another.

The server runs as its own process (``havoc serve --port 0``) so the clients (one asyncio process,
httpx, SSE parsed as a real client would) do not share its interpreter. Every request has its own
seed and ``ignore_eos`` (exactly ``--max-tokens`` each), so every mode generates the same tokens;
the ratio is pure batching gain.

    python bench/serve.py                        # havoc-tiny, random weights, a tokenizer trained here
    python bench/serve.py --checkpoint DIR       # a real checkpoint
    python bench/serve.py --server-args="--dtype float32 --threads 2"   # extra `havoc serve` flags (note the =)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def make_checkpoint(preset: str, out: Path) -> Path:
    """A randomly initialised ``preset`` with a BPE tokenizer of its vocab size trained on the pydoc topics."""
    from pydoc_data.topics import topics

    import torch

    from havoc_core.checkpoint import save_model
    from havoc_core.config import get_preset
    from havoc_core.model import HavocModel
    from havoc_core.tokenizer import HavocTokenizer

    cfg = get_preset(preset)
    tok = HavocTokenizer.train([topics[k] for k in sorted(topics)], vocab_size=cfg.vocab_size, show_progress=False)
    torch.manual_seed(0)
    return save_model(out, HavocModel(cfg), tokenizer=tok)


def start_server(checkpoint: Path, max_batch: int, extra: list[str]) -> tuple[subprocess.Popen, str, str]:
    """The server process, its URL and the first line it printed (model, slots, threads)."""
    cmd = [sys.executable, "-m", "havoc_core.cli", "serve", str(checkpoint), "--port", "0",
           "--max-batch", str(max_batch), "--model-name", "bench", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # "serving bench (...) at http://127.0.0.1:PORT ..."
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    url = "http://" + line.split("http://")[1].split()[0]
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, line.split(" at http")[0].strip()
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not answer /health")


async def one(client: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[int, float, float]:
    """Stream request ``i``; (completion tokens, seconds to first text, total seconds)."""
    body = {"model": "bench", "messages": [{"role": "user", "content": f"Request {i}: tell me about Python."}],
            "max_tokens": max_tokens, "seed": i, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, first or 0.0, time.perf_counter() - t0


async def run(url: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    """``requests`` requests through ``concurrency`` clients that each take the next one when done."""
    queue = list(range(requests))
    results: list[tuple[int, float, float]] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            results.append(await one(client, queue.pop(0), max_tokens))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(r[1] for r in results),
            "latency_p50_s": statistics.median(r[2] for r in results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="havoc-tiny", help="random-weight model to serve (no --checkpoint)")
    p.add_argument("--checkpoint", help="serve this checkpoint instead")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    p.add_argument("--server-args", default="", help="extra `havoc serve` flags, e.g. --server-args='--dtype float32'")
    p.add_argument("--rounds", type=int, default=3,
                   help="repeat every mode this often, interleaved; report medians (a shared CPU drifts)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(args.preset, Path(tmp) / "ckpt")
        proc, url, banner = start_server(ckpt, max(args.concurrency), args.server_args.split())
        try:
            asyncio.run(run(url, 2, 2, 8))  # warm-up: first-call allocations, connection set-up
            rounds = [[run_mode(url, args, c) for c in [1, *args.concurrency]] for _ in range(args.rounds)]
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    print(f"\n{args.checkpoint or args.preset}: {args.requests} requests x {args.max_tokens} tokens, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.rounds} rounds; {banner}")
    print("| clients | tokens/s (median) | vs sequential: median (range over rounds) | TTFT p50 | latency p50 |")
    print("|---|---|---|---|---|")
    rows = []
    for i, concurrency in enumerate([1, *args.concurrency]):
        runs = [r[i] for r in rounds]
        ratios = [r[i]["tokens_per_s"] / r[0]["tokens_per_s"] for r in rounds]
        med = statistics.median
        row = {"concurrency": concurrency, "tokens_per_s": med(x["tokens_per_s"] for x in runs),
               "ratio": med(ratios), "ratios": ratios, "ttft_p50_s": med(x["ttft_p50_s"] for x in runs),
               "latency_p50_s": med(x["latency_p50_s"] for x in runs), "runs": runs}
        rows.append(row)
        name = "1 (sequential)" if concurrency == 1 else str(concurrency)
        print(f"| {name} | {row['tokens_per_s']:.0f} | {row['ratio']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
              f"{row['ttft_p50_s'] * 1000:.0f} ms | {row['latency_p50_s']:.2f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def run_mode(url: str, args: argparse.Namespace, concurrency: int) -> dict:
    result = asyncio.run(run(url, args.requests, concurrency, args.max_tokens))
    print(f"{concurrency:>3} clients: {result['tokens']} tokens in {result['seconds']:.2f} s = "
          f"{result['tokens_per_s']:.0f} tokens/s", flush=True)
    return result


if __name__ == "__main__":
    main()
