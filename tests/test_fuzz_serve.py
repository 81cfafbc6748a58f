"""Hostile request bodies (hypothesis) against a real ``havoc serve``: whatever the fields and
values, every answer is 200 or an OpenAI-shaped 4xx naming a parameter; never a 500, a hang or a
dropped connection. Random JSON schemas go through llguidance too."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fuzzing import CASE_SECONDS, SEED
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from havoc_core.inference import load_for_inference
from havoc_core.serve import create_app

MODEL = "tiny-test"
JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=12), lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
SCHEMA_KEYS = ["type", "properties", "required", "items", "enum", "const", "anyOf", "oneOf", "allOf", "$ref",
               "minimum", "maximum", "maxLength", "minLength", "pattern", "format", "additionalProperties",
               "minItems", "maxItems", "$defs", "not", "if", "then"]
SCHEMA = st.recursive(st.dictionaries(st.sampled_from(SCHEMA_KEYS), JSON, max_size=4),
                      lambda kids: st.dictionaries(st.sampled_from(SCHEMA_KEYS), kids | JSON, max_size=4), max_leaves=8)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "x"]),
                                 "content": st.text(max_size=40) | JSON})
SHARED = {
    "temperature": st.floats(0, 2) | st.floats(-1, 3) | JSON, "top_p": st.floats(0.01, 1) | JSON,
    "stream": st.booleans(), "seed": st.integers(-(2**65), 2**65), "bogus": JSON,
}
SAMPLING = {
    "n": st.integers(1, 3) | st.integers(-1, 10),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=6),
    "logit_bias": st.dictionaries(st.integers(-3, 2000).map(str) | st.text(max_size=5), st.floats(-200, 200),
                                  max_size=3) | JSON,
    "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3), "min_p": st.floats(-1, 2),
    "top_k": st.integers(-2, 50), "repetition_penalty": st.floats(0, 3),
}
TOKENS = st.integers(1, 12) | st.integers(-3, 300) | JSON
ROUTES = {
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, {
        **SHARED, **SAMPLING, "messages": st.lists(MESSAGE, min_size=1, max_size=3) | JSON, "max_tokens": TOKENS,
        "logprobs": st.booleans() | JSON, "top_logprobs": st.integers(-1, 25),
        "response_format": st.fixed_dictionaries(
            {"type": st.sampled_from(["json_schema", "json_object", "text", "x"])},
            optional={"json_schema": st.fixed_dictionaries({"name": st.sampled_from(["a", "b c"]),
                                                            "schema": SCHEMA})}) | JSON,
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
            {"name": st.sampled_from(["f", "g", "bad name"]), "parameters": SCHEMA})}), max_size=2) | JSON,
        "tool_choice": st.sampled_from(["none", "auto", "required"])
        | st.just({"type": "function", "function": {"name": "f"}}) | JSON}),
    "/v1/completions": ({"prompt": "hi", "max_tokens": 4}, {
        **SHARED, **SAMPLING, "prompt": st.text(min_size=1, max_size=40)
        | st.lists(st.integers(-5, 2000), min_size=1, max_size=8) | JSON, "max_tokens": st.integers(0, 12) | TOKENS,
        "logprobs": st.integers(0, 5) | st.integers(-1, 25) | JSON, "echo": st.booleans(),
        "suffix": st.text(max_size=3), "best_of": st.integers(0, 3)}),
    "/v1/responses": ({"input": "hi", "max_output_tokens": 4}, {
        **SHARED, "input": st.text(max_size=40) | st.lists(MESSAGE, max_size=2) | JSON,
        "instructions": st.text(max_size=20) | JSON, "max_output_tokens": TOKENS,
        "text": st.fixed_dictionaries({"format": st.fixed_dictionaries(
            {"type": st.sampled_from(["json_schema", "text", "json_object"]), "name": st.just("a"),
             "schema": SCHEMA})}) | JSON, "tools": JSON, "previous_response_id": JSON}),
}


def _body(route: str) -> st.SearchStrategy[dict]:
    base, fields = ROUTES[route]
    return st.dictionaries(st.sampled_from(sorted(fields)), st.none(), min_size=1, max_size=3).flatmap(
        lambda keys: st.fixed_dictionaries({k: fields[k] for k in keys})).map(lambda extra: {**base, **extra})


def fuzz(examples: int) -> settings:
    """Seeded (a failure reproduces on the next run); no hypothesis deadline (it would count the
    test's own time): each request is bounded by ``post`` instead."""
    return settings(max_examples=examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def post(url: str, content: bytes | str, ctype: str = "application/json") -> httpx.Response:
    """One request, answered within CASE_SECONDS or the case fails (a slow answer is a failure, not a wait)."""
    t0 = time.monotonic()
    try:
        r = httpx.post(url, content=content, headers={"Content-Type": ctype}, timeout=CASE_SECONDS)
    except httpx.TimeoutException:
        pytest.fail(f"seed {SEED}: no answer in {CASE_SECONDS} s: {str(content)[:300]}")
    assert time.monotonic() - t0 < CASE_SECONDS, f"seed {SEED}: took over {CASE_SECONDS} s: {str(content)[:300]}"
    return r


def _non_finite(content: str) -> bool:
    """Whether the JSON text holds a NaN or Infinity literal (not merely the word in a string)."""
    found = []
    json.loads(content, parse_constant=found.append)
    return bool(found)


@pytest.fixture(scope="module")
def url(endless_checkpoint, serving):
    model, tok = load_for_inference(endless_checkpoint, pack=True)
    with serving(create_app(model, tok, model_name=MODEL, max_batch=4)) as server:
        yield server.url


@fuzz(600)
@given(case=st.sampled_from(sorted(ROUTES)).flatmap(lambda route: st.tuples(st.just(route), _body(route))))
def test_any_body_is_answered_200_or_a_named_4xx(url, case):
    route, body = case
    body = {"model": MODEL, **body}
    r = post(url + route, json.dumps(body))
    event(f"{route} {r.status_code} " + (r.json()["error"]["message"].split(":")[0] if r.status_code != 200 else ""))
    assert r.status_code in (200, 400, 404), (r.status_code, r.text[:300], body)
    if r.status_code != 200:
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], error


@fuzz(400)
@given(schema=SCHEMA | JSON, as_tool=st.booleans())
def test_any_schema_is_enforced_or_refused_by_name(url, schema, as_tool):
    """Random schemas (valid, invalid, unsupported) as response_format or a forced tool's
    parameters: a 400 naming that field, or a reply that parses whenever it ended by itself."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "temperature": 1}
    if as_tool:
        body |= {"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}],
                 "tool_choice": "required"}
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    content = json.dumps(body)  # Infinity too: not JSON, a 400 for the whole body
    r = post(url + "/v1/chat/completions", content)
    event(f"{'tools' if as_tool else 'response_format'} {r.status_code}")
    assert r.status_code in (200, 400), (r.status_code, r.text[:300], body)
    if r.status_code == 400:
        error = r.json()["error"]
        if _non_finite(content):
            assert error["param"] is None and "is not JSON" in error["message"], error
        else:
            assert error["param"].startswith("tools" if as_tool else "response_format"), error
        return
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "tool_calls":
        json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])
    elif choice["finish_reason"] == "stop":
        json.loads(choice["message"]["content"])


@pytest.mark.parametrize(("content", "ctype", "status"), [
    (b"[" * 100_000 + b"]" * 100_000, "application/json", 400),  # deep nesting
    (json.dumps({"model": MODEL, "prompt": "x" * 10_000_000}).encode(), "application/json", 413),  # 10 MB
    (b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe\xc3"}', "application/json", 400),  # not UTF-8
    (b"model=tiny-test&prompt=hi", "application/x-www-form-urlencoded", 400),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 10**400}).encode(), "application/json", 400),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1e308 * 10}).encode(), "application/json", 400),
    (b"", "application/json", 400),
])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
def test_hostile_bytes_are_refused_in_one_line(url, route, content, ctype, status):
    r = post(url + route, content, ctype)
    assert r.status_code == status, (r.status_code, r.text[:200])
    assert r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]
