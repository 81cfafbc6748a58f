"""Logprobs in OpenAI's two shapes, from the engine's ``TokenLogprob``s.

``/v1/completions`` uses the legacy shape (``tokens``, ``token_logprobs``, ``top_logprobs`` as
{token: logprob}, ``text_offset``), which lm-evaluation-harness reads to score a prompt;
``/v1/chat/completions`` uses ``content: [{token, logprob, bytes, top_logprobs}]``. A token's
string is its bytes decoded as UTF-8 (a piece of a character shows as U+FFFD); its bytes come
from the byte-level BPE vocabulary, so a client can join them back into exact text.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any

from havoc_core.engine import TokenLogprob
from havoc_core.tokenizer import SPECIAL_TOKENS

FLOOR = -9999.0  # what vLLM reports for -inf: JSON has no infinity


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte -> the byte: printable Latin-1 bytes stand
    for themselves, the other 68 (controls, space, ...) for U+0100 onwards, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(0x100 + shifted)] = b
            shifted += 1
    return table


class TokenTexts:
    """Each token id's bytes and display string, computed once per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.alphabet = _byte_alphabet()
        self.special = {i for i in (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS) if i is not None}
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token: int) -> bytes:
        if token not in self._bytes:
            entry = self.tokenizer.id_to_token(token) or ""
            if token in self.special or any(c not in self.alphabet for c in entry):
                self._bytes[token] = entry.encode()
            else:
                self._bytes[token] = bytes(self.alphabet[c] for c in entry)
        return self._bytes[token]

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")


def _lp(x: float) -> float:
    return max(x, FLOOR)


def legacy(texts: TokenTexts, ids: Sequence[int], entries: Sequence[TokenLogprob | None],
           offset: int = 0) -> dict[str, Any]:
    """The completions shape for ``ids`` (entries None: no logprob, the first prompt token).
    ``text_offset`` counts characters of the reply's text from ``offset``; special tokens add none."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token, e in zip(ids, entries, strict=True):
        out["tokens"].append(texts.text(token))
        out["text_offset"].append(offset)
        if token not in texts.special:
            offset += len(decoder.decode(texts.bytes(token)))
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_lp(e.logprob))
        top = {texts.text(t): _lp(v) for t, v in e.top}
        top.setdefault(texts.text(e.token), _lp(e.logprob))  # the chosen token is always there (as vLLM)
        out["top_logprobs"].append(top)
    return out


def chat(texts: TokenTexts, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """The chat shape: one ``{token, logprob, bytes, top_logprobs}`` per generated token."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        return {"token": texts.text(token), "logprob": _lp(logprob), "bytes": list(texts.bytes(token))}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries]
