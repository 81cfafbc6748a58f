"""Generated ids -> text deltas that are whole UTF-8 characters and never run into a stop string."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """Byte-level BPE splits characters across tokens: an incomplete character decodes to U+FFFD, so
    those are held back (and a byte sequence that never completes is dropped, not printed). A
    suffix that could still grow into a stop string is held back until it cannot."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # what has been emitted
        self.stopped = False  # a stop string was found; text ends before it

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def finish(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.stopped:
            return ""
        full = self.tokenizer.decode(self.ids).replace("\ufffd", "")
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        if hits:
            full, final, self.stopped = full[: min(hits)], True, True
        if not final:
            full = full[: len(full) - _partial_stop(full, self.stop)]
        if len(full) <= len(self.text):
            return ""
        delta, self.text = full[len(self.text):], full
        return delta


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)
