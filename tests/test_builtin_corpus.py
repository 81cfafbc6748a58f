"""Built-in corpus: deterministic, real documentation, conversations that fit the demo's context."""

import hashlib
import inspect
import json
import pydoc_data.topics
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from havoc_core.builtin_corpus import (
    builtin_conversations,
    builtin_documents,
    builtin_entries,
    trim,
)
from havoc_core.tokenizer import HavocTokenizer, render_chat

DIGEST = "import hashlib; from havoc_core.builtin_corpus import builtin_documents; " \
         "print(hashlib.sha256('\\x00'.join(builtin_documents()).encode()).hexdigest())"


def _digest(docs):
    return hashlib.sha256("\x00".join(docs).encode()).hexdigest()


def test_documents_are_the_same_in_a_fresh_process_and_after_third_party_imports():
    # transformers patches logging.Logger, torch fills logging's handler list: neither may leak in
    ours = _digest(builtin_documents())
    for prelude in ("", "import torch, transformers; "):
        out = subprocess.run([sys.executable, "-c", prelude + DIGEST], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == ours


def test_documents_hold_pydoc_topics_and_stdlib_docstrings():
    import functools
    import json as json_module

    docs = builtin_documents()
    text = "\n".join(docs)
    assert len(docs) > 300 and len(text) > 1_000_000
    assert all(inspect.cleandoc(pydoc_data.topics.topics[label].split("\n", 2)[2].strip()) in text
               for label in ("assert", "with", "calls"))
    for obj in (json_module.dumps, functools.reduce, dict.setdefault):
        assert inspect.getdoc(obj).splitlines()[0] in text
    assert " at 0x" not in text  # no object addresses: they would change from run to run
    names = {e.name for e in builtin_entries()}
    assert {"json.dumps", "functools.reduce", "os.getcwd", "builtins.str.split", "io.open"} <= names
    assert not any(n.split(".")[0] in ("antigravity", "this", "tkinter", "idlelib", "test") for n in names)


def test_conversations_are_many_valid_deterministic_and_varied():
    convs = builtin_conversations()
    assert len(convs) > 2000
    assert convs == builtin_conversations(seed=0)
    assert convs != builtin_conversations(seed=1)
    roles = [[m["role"] for m in c["messages"]] for c in convs]
    assert all(r[-1] == "assistant" and r.count("user") == r.count("assistant") for r in roles)
    assert sum(r[0] == "system" for r in roles) > len(convs) // 10
    assert sum(r.count("assistant") > 1 for r in roles) > len(convs) // 10
    assert all(m["content"].strip() for c in convs for m in c["messages"])


def test_answers_are_the_documentation_they_name():
    docs = {e.name: e.doc for e in builtin_entries()}
    checked = 0
    for c in builtin_conversations()[:500]:
        answer = c["messages"][-1]["content"]
        if answer.startswith("`"):  # "`json.dumps(obj, ...)`\n\n<the doc, trimmed>"
            title, _, body = answer.partition("`\n\n")
            name = title.strip("`").split("(")[0]
            assert docs[name].startswith(body), name
            checked += 1
    assert checked > 100


def test_every_conversation_fits_512_tokens_of_an_8192_vocab():
    tok = HavocTokenizer.train(builtin_documents(), vocab_size=8192, show_progress=False)
    longest = max(len(render_chat(tok, c["messages"])[0]) for c in builtin_conversations())
    assert longest <= 512


@given(st.text(max_size=3000), st.integers(20, 1000))
def test_trim_returns_a_prefix_within_the_limit(text, limit):
    out = trim(text, limit)
    assert len(out) <= limit
    assert text.strip().startswith(out) or out in text


def test_trim_keeps_whole_paragraphs_then_sentences():
    text = "First paragraph.\n\nSecond one here.\n\nThird."
    assert trim(text, 40) == "First paragraph.\n\nSecond one here."
    assert trim("One sentence. Two sentences. Three", 30) == "One sentence. Two sentences."


def test_write_and_read_back_builtin_conversations_as_jsonl(tmp_path):
    from havoc_core.data import write_jsonl

    convs = builtin_conversations()[:50]
    path = write_jsonl(convs, tmp_path / "c.jsonl")
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == convs
