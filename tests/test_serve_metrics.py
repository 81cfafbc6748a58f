"""``GET /metrics`` read by Prometheus's own parser (``prometheus_client.parser``) after real
traffic from the official ``openai`` client: counts and histograms must match what was served."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from havoc_core.inference import load_for_inference
from havoc_core.serve import create_app

MODEL = "tiny-test"
ASK = [{"role": "user", "content": "What does the import statement do?"}]


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_what_was_served(endless_checkpoint, serving):
    model, tok = load_for_inference(endless_checkpoint, pack=True)
    with serving(create_app(model, tok, model_name=MODEL, max_batch=4, api_key="k")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=60)
        before = samples(server.url)
        assert before[("havoc_generation_tokens_total", ())] == 0
        replies = [client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=n, temperature=0)
                   for n in (3, 5)]
        streamed = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, stream=True,
                                                       stream_options={"include_usage": True}))
        text = client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=7)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        after = samples(server.url)

    usages = [r.usage for r in replies] + [streamed[-1].usage, text.usage]
    generated = sum(u.completion_tokens for u in usages)
    assert generated == 3 + 5 + 4 + 4
    assert after[("havoc_generation_tokens_total", ())] == generated
    assert after[("havoc_prompt_tokens_total", ())] == sum(u.prompt_tokens for u in usages)
    chat, comp = "/v1/chat/completions", "/v1/completions"
    assert after[("havoc_requests_total", (("endpoint", chat), ("status", "200")))] == 3
    assert after[("havoc_requests_total", (("endpoint", comp), ("status", "200")))] == 1
    assert after[("havoc_requests_total", (("endpoint", chat), ("status", "400")))] == 1
    assert after[("havoc_requests_total", (("endpoint", "/v1/models"), ("status", "401")))] == 1
    jobs = 3 + 2  # the completions request had two prompts
    assert after[("havoc_time_to_first_token_seconds_count", ())] == jobs
    assert after[("havoc_time_per_output_token_seconds_count", ())] == generated - jobs
    assert after[("havoc_time_to_first_token_seconds_sum", ())] > 0
    assert after[("havoc_requests_running", (("model_name", MODEL),))] == 0
    assert after[("havoc_requests_waiting", (("model_name", MODEL),))] == 0
