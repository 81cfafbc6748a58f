"""Tokenizer: real BPE trained on the built-in corpus; exact round-trips; chat format and its mask;
the Jinja chat template gives the same ids through transformers."""

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from havoc_core import HavocConfig, HavocError, get_preset
from havoc_core.builtin_corpus import builtin_documents
from havoc_core.tokenizer import (
    CHAT_TEMPLATE,
    ROLES,
    SPECIAL_TOKENS,
    HavocTokenizer,
    render_chat,
    tokenizer_config_dict,
)

VOCAB = 2048
TRICKY = [
    "", " ", "  leading and trailing  ", "tab\tand\r\nwindows\nnewlines\n\n", "NUL \x00 and \x7f",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧", "中文字符和日本語のテキスト", "한국어", "Ünïcödé café naïve",
    "combining e\u0301 and \ufeffBOM", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP", "def f(x):\n    return x ** 2  # code",
    "a user typing <|eos|> or <|assistant|> or <|reserved_9|> is plain text",
]


@pytest.fixture(scope="module")
def tok() -> HavocTokenizer:
    return HavocTokenizer.train(builtin_documents(), vocab_size=VOCAB, show_progress=False)


def test_trained_on_builtin_corpus_has_requested_size_and_config_special_ids(tok):
    cfg = HavocConfig(vocab_size=VOCAB)
    assert tok.vocab_size == VOCAB
    assert tok.num_reserved == 0  # the built-in corpus has far more than 2048 merges to learn
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id)
    assert [tok.role_id(r) for r in ROLES] == [3, 4, 5]
    tok.check_compatible(cfg)
    with pytest.raises(HavocError, match="vocab_size: the tokenizer has 2048, the model config has 8192"):
        tok.check_compatible(get_preset("havoc-tiny"))
    with pytest.raises(HavocError, match="eos_token_id"):
        tok.check_compatible(dataclasses.replace(cfg, eos_token_id=7))
    with pytest.raises(HavocError, match="role: expected one of system, user, assistant, found 'tool'"):
        tok.role_id("tool")


def test_small_corpus_fills_missing_ids_with_reserved_tokens():
    small = HavocTokenizer.train(["hello world, hello tokens"] * 3, vocab_size=400, show_progress=False)
    assert small.vocab_size == 400 and small.num_reserved > 0
    assert small.token_to_id("<|reserved_399|>") == 399
    ids = small.encode("hello <|reserved_399|>")
    assert 399 not in ids and small.decode(ids) == "hello <|reserved_399|>"
    with pytest.raises(HavocError, match="vocab_size: expected at least 262"):
        HavocTokenizer.train(["x"], vocab_size=100, show_progress=False)


def test_train_files_reads_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox " * 50)
    (tmp_path / "b.jsonl").write_text('{"text": "jumps over the lazy dog"}\n')
    small = HavocTokenizer.train_files([tmp_path], vocab_size=300, show_progress=False)
    assert small.vocab_size == 300 and len(small.encode("the quick brown fox")) < len("the quick brown fox")
    (tmp_path / "c.txt").write_bytes(b"\xff")
    with pytest.raises(HavocError, match="c.txt:1: not UTF-8"):
        HavocTokenizer.train_files([tmp_path], vocab_size=300, show_progress=False)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(len(SPECIAL_TOKENS) <= i < tok.vocab_size for i in ids)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_any_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(len(SPECIAL_TOKENS) <= i < tok.vocab_size for i in ids)  # content never yields a special id


def test_encode_batch_equals_encode(tok):
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_save_load_round_trip_and_config_file(tok, tmp_path):
    tok.save(tmp_path)
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        again = HavocTokenizer.load(path)
        assert again.vocab_size == VOCAB
        assert [again.encode(t) for t in TRICKY] == [tok.encode(t) for t in TRICKY]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config == tokenizer_config_dict(tok)
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(HavocError, match="no tokenizer file"):
        HavocTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(HavocError, match="tokenizer.json: not a valid tokenizers file"):
        HavocTokenizer.load(tmp_path)
    # a real tokenizers file whose special tokens are in another order
    from tokenizers import Tokenizer, models
    other = Tokenizer(models.BPE())
    other.add_special_tokens(["<|bos|>", "<|pad|>"])
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(HavocError, match=r"tokenizer.json: special token <\|pad\|> must have id 0, found 1"):
        HavocTokenizer.load(tmp_path)


def _check_rendering(tok, messages, add_generation_prompt):
    """Re-derive the layout independently: content never holds a special id, so the role ids
    split the sequence unambiguously into <|role|> content <|eos|> turns."""
    ids, mask = render_chat(tok, messages, add_generation_prompt=add_generation_prompt)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id and mask[0] == 0
    role_of = {tok.role_id(r): r for r in ROLES}
    starts = [i for i, t in enumerate(ids) if t in role_of]
    if add_generation_prompt:
        assert ids[-1] == tok.role_id("assistant") and mask[-1] == 0
        starts = starts[:-1]
    assert len(starts) == len(messages)
    for k, (start, message) in enumerate(zip(starts, messages, strict=True)):
        end = starts[k + 1] if k + 1 < len(starts) else len(ids) - int(add_generation_prompt)
        turn, turn_mask = ids[start:end], mask[start:end]
        assert role_of[turn[0]] == message["role"] and turn[-1] == tok.eos_id
        assert tok.decode(turn[1:-1]) == message["content"]
        learn = int(message["role"] == "assistant")
        assert turn_mask == [0] + [learn] * (len(turn) - 1)
    return ids, mask


messages_strategy = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=40)}), max_size=6)


@settings(max_examples=200, deadline=None)
@given(messages_strategy, st.booleans())
def test_mask_covers_exactly_assistant_content_and_its_eos(tok, messages, add_generation_prompt):
    ids, mask = _check_rendering(tok, messages, add_generation_prompt)
    n_assistant = sum(len(tok.encode(m["content"])) + 1 for m in messages if m["role"] == "assistant")
    assert sum(mask) == n_assistant


def test_render_chat_errors_name_the_message(tok):
    with pytest.raises(HavocError, match=r"messages\[1\]\.role: expected one of system, user, assistant, found 'bot'"):
        render_chat(tok, [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}])
    with pytest.raises(HavocError, match=r"messages\[0\]\.content: expected a string, found int"):
        render_chat(tok, [{"role": "user", "content": 3}])
    with pytest.raises(HavocError, match=r"messages\[0\]: expected an object"):
        render_chat(tok, ["hi"])
    with pytest.raises(HavocError, match="messages: expected a list"):
        render_chat(tok, "hi")


CONVERSATIONS = [
    [{"role": "user", "content": "What does json.dumps do?"}],
    [{"role": "system", "content": "You answer questions about Python."},
     {"role": "user", "content": "Explain the assert statement.  "},
     {"role": "assistant", "content": "  Assert statements insert debugging assertions.\n\nExample:\n  assert x"},
     {"role": "user", "content": "Danke! 😀 中文?"},
     {"role": "assistant", "content": "Gern geschehen 👍"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "\n"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_hf_apply_chat_template_gives_identical_ids(tok, tmp_path, messages, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    hf_ids = out["input_ids"] if hasattr(out, "keys") else out  # transformers 5 returns a BatchEncoding
    ours, _ = _check_rendering(tok, messages, add_generation_prompt)
    assert list(hf_ids) == ours
    assert hf.decode(hf_ids, skip_special_tokens=True) == "".join(m["content"] for m in messages)
    with pytest.raises(Exception, match="unknown role tool"):
        hf.apply_chat_template([*messages, {"role": "tool", "content": "x"}], tokenize=True)


def test_default_70k_tokenizer_on_builtin_corpus_fits_havoc_2b(tmp_path):
    big = HavocTokenizer.train(builtin_documents(), show_progress=False)
    assert big.vocab_size == 70000
    big.check_compatible(get_preset("havoc-2b"))
    big.save(tmp_path)
    again = HavocTokenizer.load(tmp_path)
    assert [again.encode(t) for t in TRICKY] == [big.encode(t) for t in TRICKY]
    assert all(again.decode(again.encode(t)) == t for t in TRICKY)
