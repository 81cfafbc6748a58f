"""``havoc serve`` against a real uvicorn server on a free loopback port, driven by the official
``openai`` client and raw HTTP: both endpoints streamed and not, continuous batching under 32
concurrent streams, client disconnects, prefix caching, every kind of bad input, API keys, the CLI.

The model is a real tiny HavocModel (random weights) with a real BPE tokenizer trained on the pydoc
topics. One residual channel carries a constant that the output head's special-token rows read with
a large negative weight, so the model never emits <|eos|> or a role token: every request runs to
exactly ``max_tokens`` and token counts can be checked exactly, while the other tokens still depend
on the context.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from havoc_core import HavocModel
from havoc_core.checkpoint import load_config
from havoc_core.engine import Engine
from havoc_core.inference import load_for_inference
from havoc_core.precision import plan_inference
from havoc_core.sampling import SamplingParams
from havoc_core.serve import create_app, listen, serving_threads
from havoc_core.tokenizer import render_chat

CONTEXT = 256
MODEL = "tiny-test"
KEY = "sk-test-key"
HELLO = [{"role": "user", "content": "What does the import statement do?"}]


@pytest.fixture(scope="session")
def checkpoint(endless_checkpoint) -> Path:
    return endless_checkpoint


@pytest.fixture(scope="session")
def loaded(checkpoint):
    return load_for_inference(checkpoint, pack=True)  # as `havoc serve` loads it for batching


@pytest.fixture(scope="module")
def server(loaded, serving):
    model, tok = loaded
    with serving(create_app(model, tok, model_name=MODEL, max_batch=32, max_body_bytes=64 * 1024)) as s:
        yield s


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def wait_idle(server, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = health(server)
        if (h["running"] == 0 and h["waiting"] == 0) or time.monotonic() > deadline:
            return h
        time.sleep(0.05)


# --------------------------------------------------------------------------- the OpenAI API

def test_models_and_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    h = health(server)
    assert h["status"] == "ok" and h["model"] == MODEL and h["context"] == CONTEXT and h["slots"] == 32


def test_chat_completion_counts_and_stream_equals_whole(client, loaded):
    _, tok = loaded
    args = dict(model=MODEL, messages=HELLO, temperature=0, max_tokens=20, seed=1)
    whole = client.chat.completions.create(**args)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length" and choice.message.content
    prompt = render_chat(tok, HELLO, add_generation_prompt=True)[0]
    assert whole.usage.prompt_tokens == len(prompt)
    assert whole.usage.completion_tokens == 20 and whole.usage.total_tokens == len(prompt) + 20
    assert whole.object == "chat.completion" and whole.model == MODEL

    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == len(prompt)


def test_seeded_sampling_stream_equals_whole(client):
    args = dict(model=MODEL, messages=HELLO, temperature=1.0, top_p=0.9, max_tokens=24, seed=1234)
    whole = client.chat.completions.create(**args).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True))
    other = client.chat.completions.create(**{**args, "seed": 4321}).choices[0].message.content
    assert streamed == whole and other != whole


def test_completions_stream_and_whole(client, loaded):
    _, tok = loaded
    prompt = "The with statement is used to"
    whole = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == 1 + len(tok.encode(prompt)) and whole.usage.completion_tokens == 12
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"
    default = client.completions.create(model=MODEL, prompt=prompt, temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_stop_string_ends_the_reply_before_it(client):
    args = dict(model=MODEL, messages=HELLO, temperature=0, max_tokens=40)
    full = client.chat.completions.create(**args).choices[0].message.content
    stop = full[len(full) // 2:][:3]
    assert stop.strip()
    cut = client.chat.completions.create(**args, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_developer_role_and_text_parts_mean_system_and_text(client):
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "What does the import "},
                                          {"type": "text", "text": "statement do?"}]}]
    plain = [{"role": "system", "content": "Be brief."}, *HELLO]
    a = client.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_tokens=10)
    b = client.chat.completions.create(model=MODEL, messages=plain, temperature=0, max_tokens=10)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_next_turn_reuses_the_cached_prefix(client, loaded):
    _, tok = loaded
    first = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=8)
    turn2 = [*HELLO, {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And the with statement?"}]
    second = client.chat.completions.create(model=MODEL, messages=turn2, temperature=0, max_tokens=8)
    # at least the whole first prompt came from the cache (the reply may re-tokenise differently)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_free_slot_prefers_the_longest_cached_prefix(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=3)
    a, b = [1, *tok.encode("alpha beta gamma")], [1, *tok.encode("one two three")]
    greedy = SamplingParams(temperature=0, max_new_tokens=2)
    assert engine.free_slot(a) == 0
    engine.add(a, greedy, slot=0)
    engine.add(b, greedy, slot=1)
    assert engine.free_slot(b + [7]) == 2  # slot 1 holds b but is still generating
    while engine.active():
        engine.step()
    assert engine.free_slot(b + [7]) == 1 and engine.free_slot(a + [7]) == 0 and engine.free_slot([1, 9]) == 0
    assert engine.free_slot([2]) == 0  # no prefix anywhere: the lowest idle slot


# --------------------------------------------------------------------------- continuous batching

def test_a_request_gives_the_same_tokens_alone_and_in_a_batch(client, server):
    """Seeded requests decoded together with others (joining and leaving at different steps)
    produce exactly what they produce alone."""
    prompts = [f"Question {i}: what is {w}?" for i, w in enumerate(["a list", "a dict", "yield", "a class"])]

    def ask(i: int, text: str) -> str:
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                              temperature=0.8, seed=i, max_tokens=6 + 5 * i).choices[0].message.content

    alone = [ask(i, p) for i, p in enumerate(prompts)]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i, p=p: results.__setitem__(i, ask(i, p)))
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results.get(i) for i in range(len(prompts))] == alone


def test_32_concurrent_streams_all_complete(server):
    """Load: 32 streaming clients at once; every one gets exactly its max_tokens, none is lost, the
    batch really was shared, and the server is healthy afterwards."""
    before = health(server)["requests"]["completed"]

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str, str]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Request number {i}"}], max_tokens=8 + i % 9,
            temperature=1.0, seed=i, stream=True, stream_options={"include_usage": True})
        text, reason, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage:
                usage = chunk.usage
        return i, usage.completion_tokens, reason, text

    async def run() -> list[tuple[int, int, str, str]]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(32))), timeout=240)

    results = asyncio.run(run())
    assert sorted(r[0] for r in results) == list(range(32))
    for i, n, reason, text in results:
        assert (n, reason) == (8 + i % 9, "length") and text
    h = wait_idle(server)
    assert h["status"] == "ok" and h["running"] == 0 and h["waiting"] == 0
    assert h["requests"]["completed"] - before == 32
    assert h["batch_peak"] > 1  # requests were decoded together, not one after another
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 200


def test_client_disconnect_frees_the_slot(server):
    before = health(server)["requests"]["aborted"]
    body = {"model": MODEL, "messages": HELLO, "max_tokens": CONTEXT - 40, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the stream has started; now hang up
    h = wait_idle(server)
    assert h["running"] == 0 and h["requests"]["aborted"] == before + 1


def test_non_streaming_client_disconnect_stops_its_request(server):
    """A client that hangs up while its (non-streamed) request is decoding frees the slot."""
    before = health(server)["requests"]
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": CONTEXT - 40}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 30
        while health(server)["running"] == 0:  # hang up only once it is decoding
            assert time.monotonic() < deadline, "the request never started"
    h = wait_idle(server)
    assert h["requests"]["aborted"] == before["aborted"] + 1 and h["requests"]["completed"] == before["completed"]


def test_more_requests_than_slots_wait_their_turn(loaded, serving, client):
    model, tok = loaded
    asks = [dict(model=MODEL, messages=[{"role": "user", "content": f"Question {i}"}], temperature=1.0, seed=i,
                 max_tokens=5 + 3 * i) for i in range(6)]
    expected = [client.chat.completions.create(**a).choices[0].message.content for a in asks]

    async def run(url: str) -> list[str]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
            done = await asyncio.gather(*(c.chat.completions.create(**a) for a in asks))
        return [d.choices[0].message.content for d in done]

    with serving(create_app(model, tok, model_name=MODEL, max_batch=2)) as s:
        assert asyncio.run(run(s.url)) == expected
        h = health(s)
        assert h["requests"]["completed"] == 6 and h["batch_peak"] <= 2 and h["slots"] == 2


# --------------------------------------------------------------------------- bad input

def post(server, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=30, **kwargs)


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": HELLO, **fields}


BAD = [  # (body, status, param, words the message must contain)
    (b"{not json", 400, None, "invalid JSON"),
    (b"[1, 2]", 400, None, "expected a JSON object"),
    (b"\xff\xfe", 400, None, "invalid JSON"),
    ({"messages": HELLO}, 400, "model", "required"),
    (chat(temperature="hot"), 400, "temperature", '"hot"'),
    (chat(temperature=True), 400, "temperature", "true"),
    (chat(temperature=3), 400, "temperature", "less than or equal to 2"),
    (chat(max_tokens=1.5), 400, "max_tokens", "integer"),
    (chat(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    (chat(stream="yes"), 400, "stream", "boolean"),
    (chat(stop=5), 400, "stop", "a string or a list of strings"),
    (chat(stop=[""]), 400, "stop[0]", "at least 1 character"),
    (chat(n=9), 400, "n", "less than or equal to 8"),
    (chat(seed=2**70), 400, "seed", "less than"),
    (chat(presence_penalty=2.5), 400, "presence_penalty", "less than or equal to 2"),
    (chat(frequency_penalty="x"), 400, "frequency_penalty", "number"),
    (chat(logit_bias={"x": 1}), 400, "logit_bias", "token ids"),
    (chat(logit_bias={"99999": 1}), 400, "logit_bias", "token ids in [0, 1024)"),
    (chat(logit_bias={"5": 101}), 400, "logit_bias", "[-100, 100]"),
    (chat(min_p=2), 400, "min_p", "less than or equal to 1"),
    (chat(top_logprobs=21, logprobs=True), 400, "top_logprobs", "less than or equal to 20"),
    (chat(top_logprobs=2), 400, "top_logprobs", "needs logprobs"),
    (chat(audio={"voice": "alloy", "format": "wav"}), 400, "audio", "text only"),
    (chat(modalities=["text", "audio"]), 400, "modalities", "only [\"text\"]"),
    (chat(reasoning_effort="high"), 400, "reasoning_effort", "no reasoning"),
    (chat(store="yes"), 400, "store", "boolean"),
    (chat(temprature=0.5), 400, "temprature", "unknown field"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages", "array"),
    ({"model": MODEL, "messages": []}, 400, "messages", "at least one"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages[0].content", "required"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", '"wizard"'),
    ({"model": MODEL, "messages": [{"role": "function", "content": "hi"}]}, 400, "messages[0].role", "'user'"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].tool_call_id", "required"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x " * 400}]}, 400, "messages", "context"),
    (chat(max_tokens=CONTEXT), 400, "max_tokens", "at most"),
    (chat(model="gpt-4o"), 404, "model", "'gpt-4o' is not served here"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_chat_request_is_a_clear_4xx(server, body, status, param, words):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error" and (param or "request body") in error["message"]


@pytest.mark.parametrize("body,param,words", [
    ({"model": MODEL}, "prompt", "required"),
    ({"model": MODEL, "prompt": ""}, "prompt", "expected a non-empty string"),
    ({"model": MODEL, "prompt": []}, "prompt", "a list of token ids"),
    ({"model": MODEL, "prompt": ["a", 5]}, "prompt", "a list of lists of token ids"),
    ({"model": MODEL, "prompt": [[1, 2], []]}, "prompt", "expected a non-empty string"),
    ({"model": MODEL, "prompt": [1, 99999]}, "prompt", "token ids must be in [0, 1024), found 99999"),
    ({"model": MODEL, "prompt": [True]}, "prompt", "expected"),
    ({"model": MODEL, "prompt": "hi", "suffix": "x"}, "suffix", "fill-in-the-middle"),
    ({"model": MODEL, "prompt": "hi", "best_of": 3, "n": 2}, "best_of", "best_of: 3 > n=2"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"model": MODEL, "prompt": "hi", "echo": True, "logprobs": 1, "stream": True}, "echo", "without stream"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
    ({"model": MODEL, "prompt": "word " * 400}, "prompt", "context"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 10_000}, "max_tokens", "at most"),
    ({"model": MODEL, "prompt": "hi", "messages": HELLO}, "messages", "unknown field"),
])
def test_bad_completion_request_is_a_clear_400(server, body, param, words):
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_body_over_the_limit_is_413(server):
    big = chat(messages=[{"role": "user", "content": "x" * 100_000}])
    r = post(server, "/v1/chat/completions", big)
    assert r.status_code == 413 and "65,536 bytes" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit is enforced while reading
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    r = httpx.post(server.url + "/v1/chat/completions", content=chunked(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unknown_route_and_method_use_the_error_shape(server):
    r = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "/v1/nothing" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_bad_requests_during_a_stream_do_not_disturb_it(server, client):
    args = dict(model=MODEL, messages=HELLO, temperature=0, max_tokens=60)
    expected = client.chat.completions.create(**args).choices[0].message.content
    stream = client.chat.completions.create(**args, stream=True)
    text = ""
    for i, chunk in enumerate(stream):
        text += chunk.choices[0].delta.content or ""
        if i in (2, 5):
            assert post(server, "/v1/chat/completions", b"{oops").status_code == 400
            assert post(server, "/v1/chat/completions", chat(max_tokens=10**9)).status_code == 400
    assert text == expected and health(server)["status"] == "ok"


# --------------------------------------------------------------------------- API key, failures

def test_api_key_required_when_set(loaded, serving):
    model, tok = loaded
    with serving(create_app(model, tok, model_name=MODEL, api_key=KEY, max_batch=2)) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.post(s.url + "/v1/chat/completions", json=chat(max_tokens=2), headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3).usage.completion_tokens == 3
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200  # open: for load balancers
        assert httpx.get(s.url + "/", timeout=10).status_code == 200  # the page asks for the key itself


def test_a_broken_model_fails_its_requests_but_not_the_server(loaded, serving):
    model, tok = loaded
    broken = HavocModel(model.config).eval()
    with torch.no_grad():
        broken.norm.weight.fill_(float("nan"))
    with serving(create_app(broken, tok, model_name=MODEL, max_batch=2)) as s:
        r = post(s, "/v1/chat/completions", chat(max_tokens=3))
        assert r.status_code == 500 and "NaN" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_error"
        assert health(s)["status"] == "ok" and health(s)["requests"]["failed"] == 1


# --------------------------------------------------------------------------- the page and the CLI

def test_chat_page_is_self_contained(server):
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text
    for name in ("app.js", "style.css"):
        r = httpx.get(f"{server.url}/static/{name}", timeout=10)
        assert r.status_code == 200 and "https://" not in r.text and "http://" not in r.text
    assert "innerHTML" not in httpx.get(server.url + "/static/app.js", timeout=10).text


def test_listening_socket_lets_asyncio_turn_nagle_off():
    """asyncio sets TCP_NODELAY only on connections whose proto is IPPROTO_TCP; without it every
    keep-alive response waited ~40 ms for a delayed ACK (measured: /health 44 ms -> 0.8 ms)."""
    with listen("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP


def test_cli_serve_on_a_free_port(checkpoint):
    env = {**os.environ, "HAVOC_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "havoc_core.cli", "serve", str(checkpoint), "--port", "0",
                             "--max-batch", "4", "--model-name", MODEL, "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {MODEL} ") and "http://127.0.0.1:" in line, line
        assert "4 slots, 1 torch thread" in line, line
        if torch.backends.mkldnn.is_available():  # the plan of a batching engine on this CPU, as carried out
            assert plan_inference(load_config(checkpoint).num_parameters(), batching=True).describe() in line, line
        url = line.split("http://")[1].split()[0]
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert client.completions.create(model=MODEL, prompt="x", max_tokens=4).usage.completion_tokens == 4
        assert httpx.get(f"http://{url}/v1/models", timeout=5).status_code == 401  # the key from the environment
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out


def test_cli_serve_prepack_flag():
    from havoc_core.cli import build_parser

    assert build_parser().parse_args(["serve", "ckpt"]).prepack is None  # the engine decides
    assert build_parser().parse_args(["serve", "ckpt", "--no-prepack"]).prepack is False


def test_cli_serve_refuses_a_port_in_use(checkpoint, server):
    port = server.url.rsplit(":", 1)[1]
    r = subprocess.run([sys.executable, "-m", "havoc_core.cli", "serve", str(checkpoint), "--port", port],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen"), r.stderr


def test_cli_serve_refuses_zero_threads(checkpoint):
    r = subprocess.run([sys.executable, "-m", "havoc_core.cli", "serve", str(checkpoint), "--threads", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --threads: expected an integer >= 1, found 0", r.stderr


def test_serving_threads_leave_a_core_for_the_event_loop(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert serving_threads() == max(1, cores - 1)
    assert serving_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert serving_threads() == 5
