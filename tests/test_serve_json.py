"""JSON output and tool calls through ``havoc serve`` with clients nobody here wrote: the official
``openai`` client (``response_format``, ``.parse`` with a pydantic model, ``tools``) and
langchain-openai (``with_structured_output`` both ways, ``bind_tools``), on the endless tiny model:
its weights never choose <|eos|>, so every reply that ends was ended by the grammar."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from havoc_core.inference import load_for_inference
from havoc_core.serve import create_app

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "tiny-test"
ASK = [{"role": "user", "content": "Give me a user record."}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user"]}}, "required": ["name", "age", "role"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
                                                                                    "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, so a random model's reply is short

    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def server(endless_checkpoint, serving):
    model, tok = load_for_inference(endless_checkpoint, pack=True)
    with serving(create_app(model, tok, model_name=MODEL, max_batch=8)) as s:
        yield s


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_json_schema_every_sample_validates_streamed_and_not(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, response_format=_schema_format(PERSON), n=4,
                                       temperature=1.0, seed=3, max_tokens=60)
    assert [c.finish_reason for c in r.choices] == ["stop"] * 4
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), PERSON)
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, response_format=_schema_format(PERSON),
                                                 temperature=1.0, seed=3, max_tokens=60, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content  # same seed, same sample
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_and_the_length_cut(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                       temperature=0, max_tokens=200)
    assert r.choices[0].finish_reason in ("stop", "length")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    cut = client.chat.completions.create(model=MODEL, messages=ASK, response_format=_schema_format(PERSON),
                                         temperature=0, max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3


def test_the_official_clients_parse_helper_gets_a_model_instance(client):
    r = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Person, temperature=0.8, seed=1,
                                      max_tokens=60)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 120


@pytest.mark.parametrize(("fmt", "named"), [
    (_schema_format({"not": {"type": "string"}}), "Unimplemented keys"),
    (_schema_format({"type": "objekt"}), "objekt"),
    ({"type": "json_schema"}, "response_format.json_schema: required"),
    ({"type": "yaml"}, "response_format.type"),
])
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_it(client, fmt, named):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, max_tokens=5)
    assert named in e.value.body["message"] and e.value.body["param"].startswith("response_format")


def test_forced_tool_calls_are_valid_calls_streamed_and_not(client):
    tools = [WEATHER, CLOCK]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, tool_choice="required", n=4,
                                       temperature=1.0, seed=5, max_tokens=60)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    named = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_time"
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, tool_choice="required",
                                                 temperature=1.0, seed=5, max_tokens=60, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function.arguments == r.choices[0].message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    for choice in ("none", "auto"):  # the template has no tool format: a text reply
        plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, tool_choice=choice,
                                               max_tokens=5, temperature=0)
        assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"


def test_a_conversation_with_tool_results_is_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                       max_tokens=60, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    turns = [*ASK, r.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    after = client.chat.completions.create(model=MODEL, messages=turns, max_tokens=5, temperature=0)
    assert after.choices[0].finish_reason == "length" and after.usage.prompt_tokens > r.usage.prompt_tokens
    bad = [*turns[:2], {"role": "tool", "content": "sunny"}]
    with pytest.raises(openai.BadRequestError, match=r"messages\[2\].tool_call_id: required"):
        client.chat.completions.create(model=MODEL, messages=bad, max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="'get_time' is not one of the tools"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})


def test_langchain_structured_output_and_tools(server):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=MODEL, max_retries=0, timeout=60,
                      temperature=0.7, max_tokens=60)
    for method in ("json_schema", "function_calling"):
        person = chat.with_structured_output(Person, method=method).invoke("Give me a user record.")
        assert isinstance(person, Person), method
    msg = chat.bind_tools([WEATHER], tool_choice="required").invoke("Weather?")
    assert msg.tool_calls[0]["name"] == "get_weather" and msg.tool_calls[0]["args"]["city"] in ("Paris", "Oslo")
