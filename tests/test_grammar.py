"""JSON schemas enforced during decoding (llguidance) on a random-weight model: every reply that
ends parses and validates (jsonschema, a validator nobody here wrote); one cut by the token limit
says "length"; a schema llguidance cannot enforce is refused by name before anything runs."""

from __future__ import annotations

import json

import pytest

from havoc_core.engine import Engine
from havoc_core.errors import HavocError
from havoc_core.grammar import ANY_OBJECT, SchemaError
from havoc_core.sampling import SamplingParams

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    "active": {"type": "boolean"}}, "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False}
NESTED = {"type": "object", "properties": {
    "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99},
                                                  "y": {"type": "integer", "minimum": -99, "maximum": 99}},
              "required": ["x", "y"], "additionalProperties": False},
    "label": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-z]{1,5}$"}]}},
    "required": ["point", "label"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tiny_model, tok):
    return Engine(tiny_model(), tok, max_batch=8)


@pytest.mark.parametrize("schema", [PERSON, NESTED], ids=["person", "nested"])
def test_every_reply_of_a_random_model_validates(engine, schema):
    prompts = ["Describe a user:", "x", "The with statement", "{"]
    params = SamplingParams(max_new_tokens=80, temperature=1.0, top_p=1.0, json_schema=schema, n=2, seed=1)
    replies = engine.generate(prompts, params)
    assert len(replies) == 8
    for r in replies:
        assert r.finish_reason == "stop", (r.finish_reason, r.text)
        jsonschema.validate(json.loads(r.text), schema)
        assert list(json.loads(r.text)) == list(schema["properties"])  # in the schema's order, as OpenAI's
    assert len({r.text for r in replies}) > 1  # sampled, not one forced string


def test_json_object_greedy_and_beside_unconstrained_rows(engine):
    """json_object (any object) in a batch with a plain request: the plain one is untouched."""
    plain = SamplingParams(max_new_tokens=12, temperature=0)
    alone = engine.generate(["The with statement"], plain)[0]
    slots = engine.add_batch([("The with statement", plain, None),
                              ("Reply in JSON:", SamplingParams(max_new_tokens=60, temperature=0,
                                                                json_schema=ANY_OBJECT), None)])
    while engine.active():
        engine.step()
    both = [engine.result(s) for s in slots]
    for s in slots:
        engine.remove(s)
    assert both[0].text == alone.text and both[0].ids == alone.ids
    if both[1].finish_reason == "stop":
        assert isinstance(json.loads(both[1].text), dict)
    assert both[1].text.startswith("{")


def test_a_reply_cut_by_the_limit_says_length(engine):
    r = engine.generate(["Describe a user:"], SamplingParams(max_new_tokens=3, temperature=0, json_schema=PERSON))[0]
    assert r.finish_reason == "length" and len(r.ids) == 3 and r.text.startswith('{"')


@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}, "format"),
    ({"type": "objekt"}, "objekt"),
    ({"type": "string", "pattern": "(unclosed"}, "unclosed group"),
    ({"not": {"type": "string"}}, "Unimplemented keys: \\[\"not\"\\]"),
])
def test_a_schema_it_cannot_enforce_is_refused_by_name(engine, schema, named):
    with pytest.raises(SchemaError, match=named):
        engine.add("x", SamplingParams(json_schema=schema))
    assert not engine.active()  # nothing was added


def test_conflicting_params_are_refused():
    with pytest.raises(HavocError, match="ignore_eos: not with json_schema"):
        SamplingParams(json_schema=ANY_OBJECT, ignore_eos=True).validate()


def test_havoc_generate_json_schema_from_the_command_line(tiny_model, tok, tmp_path):
    import subprocess
    import sys

    from havoc_core.checkpoint import save_model

    ckpt = save_model(tmp_path / "ckpt", tiny_model(), tokenizer=tok)
    (tmp_path / "person.json").write_text(json.dumps(PERSON))
    base = [sys.executable, "-m", "havoc_core.cli", "generate", str(ckpt), "--prompt", "Describe a user:",
            "--temperature", "0", "--max-new-tokens", "80"]
    out = subprocess.run([*base, "--json-schema", str(tmp_path / "person.json")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), PERSON)
    inline = subprocess.run([*base, "--json-schema", json.dumps(PERSON)], capture_output=True, text=True, timeout=120)
    assert inline.returncode == 0 and inline.stdout == out.stdout, inline.stderr
    for value, words in [(str(tmp_path / "nope.json"), "nope.json: no such file"),
                         ('{"not": {}}', 'json_schema: cannot be enforced: Unimplemented keys: ["not"]'),
                         ("[1]", "expected a JSON schema object")]:
        bad = subprocess.run([*base, "--json-schema", value], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert words in bad.stderr.strip().splitlines()[-1]
