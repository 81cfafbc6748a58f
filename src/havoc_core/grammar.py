"""JSON output enforced during decoding (``response_format``, tool arguments, ``--json-schema``).

llguidance (Microsoft's grammar engine: Rust, CPU, one wheel with no dependencies) turns a JSON
schema into a token mask for each step of each reply: only tokens that keep the reply a prefix of
some valid document stay, and once the document is complete only ``<|eos|>`` does. So every reply
that ends by itself parses and validates, whatever the weights; one cut by ``max_new_tokens``
says ``finish_reason: "length"``. Why llguidance and not xgrammar or outlines-core: docs/LOG.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from havoc_core.errors import HavocError

INSTALL_HINT = "pip install 'havoc[serve]' (llguidance)"
# compact, single-line JSON: a model cannot stall in endless whitespace, and replies read like OpenAI's
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}  # response_format json_object


class SchemaError(HavocError):
    """A schema llguidance cannot enforce: ``json_schema: ...`` naming the feature."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise HavocError(f"JSON-constrained output needs llguidance: {INSTALL_HINT}") from None
    return llguidance


class Grammars:
    """Compiled schemas for one tokenizer: the token table is built once (~0.1 s for 8k tokens),
    each distinct schema is compiled and checked once."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_id: int) -> None:
        self.lib = _llguidance()
        self.tokenizer = self.lib.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=eos_id)
        self.vocab_size = vocab_size
        self._compiled: dict[str, str] = {}

    def compile(self, schema: Mapping[str, Any]) -> str:
        """The llguidance grammar of ``schema``; SchemaError naming what it cannot enforce."""
        key = json.dumps(schema)  # not sorted: the properties are generated in the schema's order
        if key not in self._compiled:
            try:
                grammar = self.lib.LLMatcher.grammar_from_json_schema(key, overrides=JSON_OPTIONS)
            except ValueError as e:
                raise SchemaError(f"json_schema: not a JSON schema ({_one_line(e)})") from None
            try:
                is_error, messages = self.lib.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # llguidance 1.9 panics (pyo3's PanicException is a BaseException)
                # while cutting its error message inside a multi-byte character (docs/LOG.md)
                raise SchemaError(f"json_schema: cannot be enforced (llguidance: {_one_line(e)[:120]})") from None
            if is_error:
                raise SchemaError(f"json_schema: cannot be enforced: {_one_line(messages[0])}")
            self._compiled[key] = grammar
        return self._compiled[key]

    def matcher(self, schema: Mapping[str, Any]) -> Constraint:
        return Constraint(self.lib.LLMatcher(self.tokenizer, self.compile(schema)), self.vocab_size)


class Constraint:
    """One reply's position in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self) -> Tensor:
        """bool [V]: the tokens that keep the reply valid."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits.astype(bool))

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise HavocError(f"grammar: token {token} was not allowed ({self.matcher.get_error()})")


def mask_logits(logits: Tensor, constraints: Sequence[Constraint | None]) -> Tensor:
    """``logits`` [N, V] with each token its row's grammar forbids at -inf: a copy, made only when
    some row is constrained (the plain path pays nothing); the logprobs reported stay the model's."""
    if all(c is None for c in constraints):
        return logits
    logits = logits.clone()
    for row, c in zip(logits, constraints, strict=True):
        if c is not None:
            row.masked_fill_(~c.allowed(), -torch.inf)
    return logits


def _one_line(e: Any) -> str:
    """llguidance's message on one line (a regex error spans several)."""
    return " ".join(str(e).split()) or type(e).__name__
