"""``havoc serve`` with the fields real clients send: the official ``openai`` client and
langchain-openai against a real uvicorn server on the endless tiny model (see test_serve.py).

Prompt forms and ``index``, ``echo``, logprobs in both shapes (checked against the model's own
log-softmax in fp32), ``n`` samples, penalties and ``logit_bias`` (on token preferences read from
the model itself), and the spec's bookkeeping fields.
"""

from __future__ import annotations

import math

import openai
import pytest
import torch

from havoc_core.inference import load_for_inference
from havoc_core.serve import create_app
from havoc_core.tokenizer import render_chat

MODEL = "tiny-test"
HELLO = [{"role": "user", "content": "What does the import statement do?"}]
PROMPT = "The with statement is used to"


@pytest.fixture(scope="module")
def loaded(endless_checkpoint):
    return load_for_inference(endless_checkpoint, pack=True)


@pytest.fixture(scope="module")
def server(loaded, serving):
    model, tok = loaded
    with serving(create_app(model, tok, model_name=MODEL, max_batch=8)) as s:
        yield s


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(model, ids: list[int]) -> torch.Tensor:
    """log-softmax in fp32 of the model's own logits at every position of ``ids``."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


# --------------------------------------------------------------------------- /v1/completions

def test_every_prompt_form_gives_one_choice_per_prompt(client, loaded):
    _, tok = loaded
    texts = [PROMPT, "A list is"]
    single = [client.completions.create(model=MODEL, prompt=t, temperature=0, max_tokens=6).choices[0].text
              for t in texts]
    many = client.completions.create(model=MODEL, prompt=texts, temperature=0, max_tokens=6)
    assert [c.index for c in many.choices] == [0, 1] and [c.text for c in many.choices] == single
    ids = [[tok.bos_id, *tok.encode(t)] for t in texts]
    assert many.usage.prompt_tokens == sum(map(len, ids)) and many.usage.completion_tokens == 12
    one = client.completions.create(model=MODEL, prompt=ids[0], temperature=0, max_tokens=6)
    assert one.choices[0].text == single[0] and one.usage.prompt_tokens == len(ids[0])  # ids as given
    both = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=6)
    assert [c.text for c in both.choices] == single
    n2 = client.completions.create(model=MODEL, prompt=texts, temperature=0, max_tokens=6, n=2, best_of=2)
    assert [c.index for c in n2.choices] == [0, 1, 2, 3]  # prompt-major, as OpenAI numbers them
    assert [c.text for c in n2.choices] == [single[0], single[0], single[1], single[1]]
    streamed = list(client.completions.create(model=MODEL, prompt=texts, temperature=0, max_tokens=6, stream=True))
    for i in range(2):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) == single[i]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_score_the_prompt_as_lm_eval_asks(client, loaded, max_tokens):
    """lm-eval's local-completions loglikelihood request: token ids, echo, logprobs=1, max_tokens 0/1."""
    model, tok = loaded
    ids = [tok.bos_id, *tok.encode(PROMPT)]
    r = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=max_tokens,
                                  temperature=0)
    lp = r.choices[0].logprobs
    n = len(ids) + max_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference(model, ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    assert "".join(lp.tokens[1:len(ids)]) == PROMPT and r.choices[0].text.startswith(PROMPT)
    assert lp.text_offset[:3] == [0, 0, len(lp.tokens[1])]  # <|bos|> adds no text
    if max_tokens:
        greedy = int(ref[-1].argmax())
        assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1, greedy]), abs=1e-4)
        assert r.usage.completion_tokens == 1
    else:
        assert r.choices[0].text == PROMPT and r.usage.completion_tokens == 0


def test_completion_logprobs_stream_and_whole(client, loaded):
    model, tok = loaded
    args = dict(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8, logprobs=3)
    whole = client.completions.create(**args).choices[0]
    lp = whole.logprobs
    ids = [tok.bos_id, *tok.encode(PROMPT)]
    ref = reference(model, ids + [tok.token_to_id(t) or 0 for t in ()] + _ids_of(tok, lp.tokens))
    for i, v in enumerate(lp.token_logprobs):
        assert v == pytest.approx(float(ref[len(ids) - 1 + i].max()), abs=1e-4)  # greedy: the top one
        assert len(lp.top_logprobs[i]) == 3
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    chunks = list(client.completions.create(**args, stream=True))
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs and "".join(c.choices[0].text for c in chunks) == whole.text


def _ids_of(tok, tokens: list[str]) -> list[int]:
    """Ids of the generated token strings (ASCII here: each string re-encodes to itself)."""
    return [i for t in tokens for i in tok.encode(t)]


# --------------------------------------------------------------------------- /v1/chat/completions

def test_chat_logprobs_stream_and_whole(client, loaded):
    model, tok = loaded
    args = dict(model=MODEL, messages=HELLO, temperature=0, max_tokens=8, logprobs=True, top_logprobs=4)
    whole = client.chat.completions.create(**args).choices[0]
    content = whole.logprobs.content
    assert len(content) == 8 and all(len(c.top_logprobs) == 4 for c in content)
    assert b"".join(bytes(c.bytes) for c in content).decode() == whole.message.content
    ids = render_chat(tok, HELLO, add_generation_prompt=True)[0]
    ref = reference(model, ids + tok.encode(whole.message.content))
    for i, c in enumerate(content):
        assert c.logprob == pytest.approx(float(ref[len(ids) - 1 + i].max()), abs=1e-4)
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6) and c.top_logprobs[0].token == c.token
    chunks = list(client.chat.completions.create(**args, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    # same tokens; the stream's prompt was partly cached, so its prefill ran fewer tokens (rounding differs)
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=8).choices[0]
    assert plain.logprobs is None and plain.message.content == whole.message.content


def test_n_samples_are_their_seeds_and_stream_by_index(client):
    args = dict(model=MODEL, messages=HELLO, temperature=1.0, max_tokens=10)
    many = client.chat.completions.create(**args, n=3, seed=11)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.usage.completion_tokens == 30
    alone = [client.chat.completions.create(**args, seed=11 + j).choices[0].message.content for j in range(3)]
    assert [c.message.content for c in many.choices] == alone and len(set(alone)) > 1
    chunks = list(client.chat.completions.create(**args, n=3, seed=11, stream=True))
    for j in range(3):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == j) == alone[j]


def test_logit_bias_and_penalties_move_the_models_known_preferences(client, loaded):
    model, tok = loaded
    ids = render_chat(tok, HELLO, add_generation_prompt=True)[0]
    ref = reference(model, ids)[-1]
    first, second = ref.topk(2).indices.tolist()
    args = dict(model=MODEL, messages=HELLO, temperature=0, max_tokens=1, logprobs=True)
    got = client.chat.completions.create(**args).choices[0].logprobs.content[0]
    assert list(got.bytes) == list(_bytes(tok, first))
    banned = client.chat.completions.create(**args, logit_bias={str(first): -100}).choices[0].logprobs.content[0]
    assert list(banned.bytes) == list(_bytes(tok, second))
    assert banned.logprob == pytest.approx(float(ref[second]), abs=1e-4)  # logprobs are the model's, unbiased
    forced = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=12,
                                            logit_bias={str(second): 100}, logprobs=True).choices[0]
    assert {bytes(c.bytes) for c in forced.logprobs.content} == {_bytes(tok, second)}
    long = dict(model=MODEL, messages=HELLO, temperature=0, max_tokens=60, logprobs=True)

    def distinct(**kw) -> int:
        return len({bytes(c.bytes) for c in client.chat.completions.create(**long, **kw).choices[0].logprobs.content})

    assert distinct(presence_penalty=2.0) > distinct()
    assert distinct(frequency_penalty=2.0) > distinct()
    assert distinct(presence_penalty=-2.0, frequency_penalty=-2.0) <= distinct()


def _bytes(tok, token: int) -> bytes:
    from havoc_core.openai_logprobs import TokenTexts

    return TokenTexts(tok).bytes(token)


def test_min_p_one_is_greedy(client):
    greedy = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=10)
    hot = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=2.0, max_tokens=10,
                                         extra_body={"min_p": 1.0}, seed=3)
    assert hot.choices[0].message.content == greedy.choices[0].message.content


def test_spec_bookkeeping_fields_are_accepted(client):
    r = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=3, store=True, metadata={"who": "test"}, service_tier="auto",
        parallel_tool_calls=False, user="u1", prompt_cache_key="k", safety_identifier="s", modalities=["text"],
        response_format={"type": "text"}, stream=True, stream_options={"include_usage": True})
    chunks = list(r)
    assert chunks[-1].usage.completion_tokens == 3
    c = client.completions.create(model=MODEL, prompt="x", max_tokens=2, user="u1", seed=1, best_of=1)
    assert c.usage.completion_tokens == 2


def test_logprob_values_are_finite_json(client):
    """The endless model gives special tokens logits near -300: reported, never -inf/NaN."""
    r = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=2, logprobs=True,
                                       top_logprobs=20)
    assert all(math.isfinite(t.logprob) for c in r.choices[0].logprobs.content for t in c.top_logprobs)


# --------------------------------------------------------------------------- LangChain

def test_langchain_chat_and_completions_clients_work_unchanged(server, client):
    from langchain_openai import ChatOpenAI, OpenAI

    args = {"base_url": server.url + "/v1", "api_key": "unused", "model": MODEL, "max_retries": 0, "timeout": 60}
    chat = ChatOpenAI(**args, temperature=0, max_tokens=8, presence_penalty=0.5, frequency_penalty=0.5)
    greedy = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=8,
                                            presence_penalty=0.5, frequency_penalty=0.5)
    said = chat.invoke(HELLO[0]["content"])
    assert said.content == greedy.choices[0].message.content and said.response_metadata["finish_reason"]
    assert "".join(chunk.content for chunk in chat.stream(HELLO[0]["content"])) == said.content
    assert [m.content for m in chat.batch([HELLO[0]["content"]] * 2)] == [said.content] * 2
    scored = chat.bind(logprobs=True, top_logprobs=2).invoke(HELLO[0]["content"])
    assert len(scored.response_metadata["logprobs"]["content"]) == said.usage_metadata["output_tokens"]

    # the completions wrapper sends prompt as a list with penalties and logprobs set by default
    llm = OpenAI(**args, temperature=0, max_tokens=6)
    text = llm.invoke(PROMPT)
    assert text == client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=6).choices[0].text
    assert "".join(llm.stream(PROMPT)) == text
