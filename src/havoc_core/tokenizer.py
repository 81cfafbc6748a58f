"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``), special tokens and the chat format.

A checkpoint dir carries ``tokenizer.json`` + ``tokenizer_config.json``, so it alone is enough to
chat, and ``transformers.AutoTokenizer`` reads the same two files (chat template included).

Chat format: ``<|bos|>`` once, then ``<|role|> content <|eos|>`` per message; the generation
prompt is ``<|assistant|>``. ``render_chat`` is the one implementation (SFT, chat, serving);
``CHAT_TEMPLATE`` is the same format in Jinja for ``apply_chat_template``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from havoc_core.atomic import write_atomic
from havoc_core.errors import HavocError
from havoc_core.sources import read_documents

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]  # ids 0..5
ROLES = ("system", "user", "assistant")
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # special tokens + every byte

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ' (expected system, user or assistant)') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class HavocTokenizer:
    """A ``tokenizers.Tokenizer`` whose first ids are ``SPECIAL_TOKENS``.

    ``encode`` treats text that looks like a special token (``"<|eos|>"`` typed by a user) as plain
    text, so message content can never forge a turn boundary; only ``render_chat`` emits specials.
    """

    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer") -> None:
        for i, token in enumerate(SPECIAL_TOKENS):
            found = tokenizer.token_to_id(token)
            if found != i:
                raise HavocError(f"{source}: special token {token} must have id {i}, found {found}")
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.num_reserved: int = len(tokenizer.get_added_tokens_decoder()) - len(SPECIAL_TOKENS)  # never produced
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one id can stand for: a text longer than ``n * max_token_chars``
        needs more than ``n`` ids, known without tokenizing it (a 10 MB message is refused at once)."""
        return max(map(len, self._tok.get_vocab(with_added_tokens=False)))

    # ------------------------------------------------------------------ training and files

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 70000, show_progress: bool = True) -> HavocTokenizer:
        """Train byte-level BPE; every byte is in the base alphabet, so any text round-trips. Ids
        the text has no merges for are filled with ``<|reserved_N|>`` tokens (``num_reserved``)."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise HavocError(f"vocab_size: expected at least {MIN_VOCAB_SIZE} "
                             f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes), found {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=show_progress,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        length = len(texts) if isinstance(texts, Sequence) else None
        tok.train_from_iterator(texts, trainer, length=length)
        # Small corpora run out of pairs to merge before vocab_size (the built-in one near 24k):
        # the remaining ids become reserved special tokens, so the size a model config names holds.
        learned = tok.get_vocab_size(with_added_tokens=True)
        tok.add_special_tokens([AddedToken(f"<|reserved_{i}|>", special=True, normalized=False)
                                for i in range(learned, vocab_size)])
        return cls(tok)

    @classmethod
    def train_files(cls, paths: Iterable[str | Path], vocab_size: int = 70000, show_progress: bool = True,
                    skip_invalid: bool = False) -> HavocTokenizer:
        """Train on text files or ``{"text": ...}`` JSONL (see ``sources.read_documents``)."""
        return cls.train(list(read_documents(paths, skip_invalid=skip_invalid)), vocab_size, show_progress)

    @classmethod
    def load(cls, path: str | Path) -> HavocTokenizer:
        """A directory holding ``tokenizer.json``, or the file itself."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise HavocError(f"{file}: no tokenizer file (expected {TOKENIZER_FILE}, "
                             "as written by `havoc tokenizer train`)")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises a bare Exception for malformed files
            raise HavocError(f"{file}: not a valid tokenizers file ({e})") from e
        return cls(tok, source=str(file))

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, chat template)."""
        directory = Path(directory)
        write_atomic(directory / TOKENIZER_FILE, self._tok.to_str(pretty=True))
        config = json.dumps(tokenizer_config_dict(self), indent=2, ensure_ascii=False)
        write_atomic(directory / TOKENIZER_CONFIG_FILE, config + "\n")

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; never adds special tokens. (The batch call skips the offsets
        ``Tokenizer.encode`` computes: ~30% faster, same ids.)"""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of many texts at once (parallel in Rust unless TOKENIZERS_PARALLELISM=false)."""
        try:
            return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]
        except TypeError:  # the Rust side takes only valid Unicode: not an unpaired surrogate
            raise HavocError(_not_text(texts)) from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def role_id(self, role: str) -> int:
        if role not in ROLES:
            raise HavocError(f"role: expected one of {', '.join(ROLES)}, found {role!r}")
        return 3 + ROLES.index(role)

    def turn_stop_ids(self) -> list[int]:
        """Ids that end a reply besides ``<|eos|>``: any token that would open another turn."""
        return [self.bos_id, self.pad_id, *(self.role_id(r) for r in ROLES)]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        """The vocabulary entry (byte-level alphabet: a space is ``Ġ``); logprobs turn it into bytes."""
        return self._tok.id_to_token(id)

    def to_json(self) -> str:
        """The full definition (what ``tokenizer.json`` holds); data manifests record its hash."""
        return self._tok.to_str()

    def check_compatible(self, config: Any) -> None:
        """HavocError unless the model config (``HavocConfig``) agrees on vocab size and special ids."""
        pairs = [("vocab_size", self.vocab_size), ("pad_token_id", self.pad_id),
                 ("bos_token_id", self.bos_id), ("eos_token_id", self.eos_id)]
        for field, ours in pairs:
            theirs = getattr(config, field)
            if theirs != ours:
                raise HavocError(f"{field}: the tokenizer has {ours}, the model config has {theirs}")

    def __repr__(self) -> str:
        return f"HavocTokenizer(vocab_size={self.vocab_size}, num_reserved={self.num_reserved})"


def tokenizer_config_dict(tok: HavocTokenizer, model_max_length: int | None = None) -> dict[str, Any]:
    """``tokenizer_config.json`` for ``transformers`` (also used by ``havoc export``)."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[tok.bos_id],
        "eos_token": SPECIAL_TOKENS[tok.eos_id],
        "pad_token": SPECIAL_TOKENS[tok.pad_id],
        "additional_special_tokens": [SPECIAL_TOKENS[tok.role_id(r)] for r in ROLES],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def render_chat(tok: HavocTokenizer, messages: Sequence[dict[str, Any]],
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Ids of a conversation and its loss mask: ``mask[i] == 1`` exactly where ``ids[i]`` is
    assistant content or the ``<|eos|>`` closing an assistant turn (what SFT trains on)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise HavocError(f"messages: expected a list of {{role, content}} objects, found {type(messages).__name__}")
    roles, contents = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise HavocError(f"messages[{i}]: expected an object with role and content, found {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise HavocError(f"messages[{i}].role: expected one of {', '.join(ROLES)}, found {role!r}")
        if not isinstance(content, str):
            raise HavocError(f"messages[{i}].content: expected a string, found {type(content).__name__}")
        roles.append(role)
        contents.append(content)
    ids, mask = [tok.bos_id], [0]
    for role, body in zip(roles, tok.encode_batch(contents), strict=True):
        learn = int(role == "assistant")
        ids += [tok.role_id(role), *body, tok.eos_id]
        mask += [0] + [learn] * (len(body) + 1)
    if add_generation_prompt:
        ids.append(tok.role_id("assistant"))
        mask.append(0)
    return ids, mask


def _not_text(texts: Sequence[str]) -> str:
    """Why ``texts`` cannot be tokenized: where the first unpaired surrogate is (as Python reads
    invalid UTF-8 in a command line, ``\\udcff``), or what the non-string is."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            return f"text {i}: expected a string, found {type(text).__name__}"
        bad = next((j for j, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
        if bad is not None:
            return (f"text at character {bad}: {text[bad]!r} is not a Unicode character (invalid UTF-8 or an "
                    "unpaired surrogate): expected valid text")
    return "text: cannot be tokenized"

