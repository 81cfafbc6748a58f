"""Data pipeline: shards read back identical to a direct encode; conversation examples and their
masks; every bad input named by file and line; the CLI commands."""

import json
import random
import string

import numpy as np
import pytest

from havoc_core import HavocError
from havoc_core.builtin_corpus import builtin_conversations, builtin_documents
from havoc_core.cli import main
from havoc_core.data import (
    MANIFEST,
    load_conversations,
    open_split,
    prepare_conversations,
    tokenizer_hash,
    write_jsonl,
)
from havoc_core.prepare import prepare_pretrain
from havoc_core.tokenizer import HavocTokenizer, render_chat


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return builtin_documents()[:80]


@pytest.fixture(scope="module")
def tok(docs) -> HavocTokenizer:
    return HavocTokenizer.train(docs, vocab_size=1024, show_progress=False)


def _split_documents(stream: np.ndarray, tok) -> list[list[int]]:
    """Cut a token stream back into documents: content never holds bos/eos, so they delimit it."""
    assert stream.dtype == np.uint32
    ends = np.flatnonzero(stream == tok.eos_id)
    docs, start = [], 0
    for end in ends:
        assert stream[start] == tok.bos_id
        docs.append(stream[start + 1 : end].tolist())
        start = end + 1
    assert start == len(stream)
    return docs


def _check_against_direct_encode(out, texts, tok):
    """Every document lands whole in exactly one split, in order, as ``encode`` gives it."""
    split_docs = {s: _split_documents(np.concatenate(open_split(out, s)), tok) if open_split(out, s) else []
                  for s in ("train", "val")}
    pos = {"train": 0, "val": 0}
    for text in texts:
        expected = tok.encode(text)
        for s in ("train", "val"):
            if pos[s] < len(split_docs[s]) and split_docs[s][pos[s]] == expected:
                pos[s] += 1
                break
        else:
            raise AssertionError(f"document not found in either split: {text[:60]!r}")
    assert pos == {s: len(d) for s, d in split_docs.items()}
    return split_docs


def test_shards_read_back_identical_to_a_direct_encode(tmp_path, docs, tok):
    out = tmp_path / "data"
    manifest = prepare_pretrain(docs, tok, out, val_fraction=0.1, shard_tokens=20_000, show_progress=False)
    split_docs = _check_against_direct_encode(out, docs, tok)
    assert len(split_docs["val"]) > 0 and len(split_docs["train"]) > len(split_docs["val"])
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert manifest["vocab_size"] == 1024 and manifest["tokenizer_hash"] == tokenizer_hash(tok)
    train = manifest["splits"]["train"]
    assert len(train["shards"]) > 1  # shard_tokens is small
    assert train["tokens"] == sum(len(s) for s in open_split(out, "train"))
    assert train["documents"] + manifest["splits"]["val"]["documents"] == len(docs)
    assert tokenizer_hash(HavocTokenizer.load(out)) == manifest["tokenizer_hash"]  # the data dir carries it
    shard = open_split(out, "train")[0]
    with pytest.raises(ValueError):
        shard[0] = 5  # read-only


def test_ids_above_uint16_survive(tmp_path):
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(60_000)]
    texts = [" ".join(words[i : i + 100]) for i in range(0, len(words), 100)]
    big = HavocTokenizer.train(texts, vocab_size=70_000, show_progress=False)
    assert max(max(ids) for ids in big.encode_batch(texts)) > 65_535
    prepare_pretrain(texts, big, tmp_path, show_progress=False)
    _check_against_direct_encode(tmp_path, texts, big)


def test_files_as_sources_and_skip_invalid(tmp_path, tok):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("first document")
    (tmp_path / "in" / "b.jsonl").write_text('{"text": "second"}\n{oops\n{"text": "third"}\n')
    with pytest.raises(HavocError, match=r"b.jsonl:2: not valid JSON"):
        prepare_pretrain([tmp_path / "in"], tok, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written
    manifest = prepare_pretrain([tmp_path / "in"], tok, tmp_path / "out", skip_invalid=True, show_progress=False)
    assert manifest["skipped"] == 1
    _check_against_direct_encode(tmp_path / "out", ["first document", "second", "third"], tok)


def test_val_split_is_never_silently_empty(tmp_path, tok):
    manifest = prepare_pretrain(["a", "b"], tok, tmp_path / "two", val_fraction=0.01, show_progress=False)
    assert manifest["splits"]["val"]["documents"] == 1 and manifest["splits"]["train"]["documents"] == 1
    with pytest.raises(HavocError, match="only 1 document"):
        prepare_pretrain(["a"], tok, tmp_path / "one", show_progress=False)
    manifest = prepare_pretrain(["a"], tok, tmp_path / "one", val_fraction=0.0, show_progress=False)
    assert manifest["splits"]["val"]["documents"] == 0 and open_split(tmp_path / "one", "val") == []
    with pytest.raises(HavocError, match="no documents"):
        prepare_pretrain([], tok, tmp_path / "none", show_progress=False)
    with pytest.raises(HavocError, match=r"document 1: expected a non-empty string"):
        prepare_pretrain(["a", "  "], tok, tmp_path / "blank", show_progress=False)
    with pytest.raises(HavocError, match=r"val_fraction: expected a number in \[0, 1\), found 1.5"):
        prepare_pretrain(["a"], tok, tmp_path / "x", val_fraction=1.5)


def test_open_split_errors(tmp_path, tok):
    with pytest.raises(HavocError, match="manifest.json: no such file"):
        open_split(tmp_path, "train")
    prepare_pretrain(["one doc", "another doc", "third"], tok, tmp_path, show_progress=False)
    with pytest.raises(HavocError, match=r"splits: expected a 'test' split, found \['train', 'val'\]"):
        open_split(tmp_path, "test")
    shard = tmp_path / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(HavocError, match=r"train_00000.bin: expected \d+ bytes .* found \d+"):
        open_split(tmp_path, "train")
    shard.unlink()
    with pytest.raises(HavocError, match="train_00000.bin: shard listed in manifest.json is missing"):
        open_split(tmp_path, "train")
    (tmp_path / MANIFEST).write_text('{"format": "something-else"}')
    with pytest.raises(HavocError, match="format: expected 'havoc-token-shards', found 'something-else'"):
        open_split(tmp_path, "train")


# --------------------------------------------------------------------------- conversations

GOOD = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                     {"role": "assistant", "content": "4 😀"}]}


def test_conversations_from_file_and_records_match_render_chat(tmp_path, tok):
    records = [GOOD, *builtin_conversations()[:30]]
    path = write_jsonl(records, tmp_path / "c.jsonl")
    from_file = load_conversations(path, tok, max_len=4096)
    assert from_file == load_conversations(records, tok, max_len=4096)
    assert from_file == [render_chat(tok, r["messages"]) for r in records]
    ids, mask = from_file[0]
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False) == "4 😀<|eos|>"


BAD_LINES = [
    ("not json", r"c.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"c.jsonl:2: messages\[0\].role: expected one of"),
    ('{"messages": [{"role": "user", "content": "hello?"}]}', r"c.jsonl:2: messages: expected at least one assistant"),
    ('{"text": "hi"}', r"c.jsonl:2: expected an object with \"messages\", found \['text'\]"),
    ('{"messages": [{"role": "user", "content": ["x"]}]}', r"c.jsonl:2: messages\[0\].content: expected a string"),
    ('{"messages": [{"role": "user", "content": "' + "long " * 400 + '"}, {"role": "assistant", "content": "ok"}]}',
     r"c.jsonl:2: \d+ tokens, longer than max_len 256 \(conversations are never truncated"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_conversations_name_file_and_line(tmp_path, tok, line, message, capsys):
    path = tmp_path / "c.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n" + line + "\n").encode())
    with pytest.raises(HavocError, match=message):
        load_conversations(path, tok, max_len=256)
    assert load_conversations(path, tok, max_len=256, skip_invalid=True) == [render_chat(tok, GOOD["messages"])]
    assert "skipped 1 invalid conversations (first: " in capsys.readouterr().err


def test_missing_conversations_file(tmp_path, tok):
    with pytest.raises(HavocError, match="nope.jsonl: no such conversations file"):
        load_conversations(tmp_path / "nope.jsonl", tok, 512)


def test_prepare_conversations_keeps_the_valid_ones(tmp_path, tok):
    records = [GOOD, {"messages": [{"role": "user", "content": "no answer"}]}, GOOD]
    skipped = prepare_conversations(records, tok, 512, tmp_path / "sft.jsonl", skip_invalid=True)
    assert skipped["conversations"] == 2 and skipped["skipped"] == 1
    assert load_conversations(tmp_path / "sft.jsonl", tok, 512) == [render_chat(tok, GOOD["messages"])] * 2


# --------------------------------------------------------------------------- CLI

def test_cli_tokenizer_train_and_prepare(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl([{"text": d} for d in builtin_documents()[:40]], corpus)
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "600", "--out", str(tmp_path / "tok")]) == 0
    tok = HavocTokenizer.load(tmp_path / "tok")
    assert tok.vocab_size == 600
    assert main(["prepare", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "data"),
                 "--val-fraction", "0.1"]) == 0
    _check_against_direct_encode(tmp_path / "data", builtin_documents()[:40], tok)
    assert main(["prepare", "--sft", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "sft.jsonl"),
                 "--max-len", "2048"]) == 0
    assert len(load_conversations(tmp_path / "sft.jsonl", tok, 2048)) == len(builtin_conversations())
    capsys.readouterr()

    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff")
    assert main(["tokenizer", "train", str(tmp_path / "bad.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "t2")]) == 2
    assert "error: " + str(tmp_path / "bad.txt") + ":2: not UTF-8" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "bad.txt"), str(corpus), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "d2"), "--skip-invalid"]) == 0
    assert "skipped 1 invalid inputs" in capsys.readouterr().err
