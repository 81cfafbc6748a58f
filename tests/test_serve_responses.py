"""``POST /v1/responses`` with the official ``openai`` client (``responses.create``, and the
``responses.stream`` helper, which checks the event sequence as it accumulates it), on the
endless tiny model: the same tokens as the chat endpoint for the same conversation."""

from __future__ import annotations

import json

import openai
import pytest

from havoc_core.inference import load_for_inference
from havoc_core.serve import create_app

MODEL = "tiny-test"
QUESTION = "What does the import statement do?"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                           "maximum": 9}},
          "required": ["ok", "n"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}


@pytest.fixture(scope="module")
def client(endless_checkpoint, serving):
    model, tok = load_for_inference(endless_checkpoint, pack=True)
    with serving(create_app(model, tok, model_name=MODEL, max_batch=4)) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_a_response_is_the_chat_reply_of_the_same_conversation(client):
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=6, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}])
    r = client.responses.create(model=MODEL, instructions="Be brief.", input=QUESTION, temperature=0,
                                max_output_tokens=6)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == chat.choices[0].message.content
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"  # never ends itself
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, 6)
    parts = client.responses.create(model=MODEL, temperature=0, max_output_tokens=6, input=[
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}])
    assert parts.output_text == r.output_text


def test_the_stream_helper_accumulates_the_same_response(client):
    whole = client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=8)
    with client.responses.stream(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=8) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # cut by max_output_tokens, as OpenAI reports it
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with client.responses.stream(model=MODEL, input=QUESTION, max_output_tokens=40, text={"format": FORMAT},
                                 temperature=0) as stream:
        final = stream.get_final_response()  # the helper needs response.completed
    assert final.status == "completed" and set(json.loads(final.output_text)) == {"ok", "n"}


def test_text_format_json_schema_completes_with_valid_json(client):
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=40, text={"format": FORMAT})
    assert r.status == "completed" and set(json.loads(r.output_text)) == {"ok", "n"}


@pytest.mark.parametrize(("args", "param", "words"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
    ({"max_output_tokens": 10_000}, "max_output_tokens", "exceed the context"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools", "/v1/chat/completions"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format", "expected"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input", "only message items"),
])
def test_what_it_cannot_do_is_a_400_naming_the_field(client, args, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**{"model": MODEL, "input": QUESTION, "max_output_tokens": 4, **args})
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body
