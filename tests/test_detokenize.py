"""Detokenising a stream of byte-level BPE ids: whole characters only, stop strings held back."""

import pytest

from havoc_core.detokenize import TextStream


@pytest.mark.parametrize("text", ["emoji 😀👍🏽 family 👨‍👩‍👧 done", "中文字符和日本語のテキスト", "Ünïcödé café"])
def test_text_stream_only_whole_characters(tok, text):
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # characters really are split across tokens
    stream = TextStream(tok)
    deltas = [stream.push(t) for t in ids] + [stream.finish()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert any(d == "" for d in deltas)  # some tokens were held back mid-character


def test_text_stream_holds_back_a_possible_stop_string(tok):
    ids = tok.encode("alpha beta ### gamma")
    stream = TextStream(tok, stop=["###"])
    deltas = [stream.push(t) for t in ids]
    assert "".join(deltas) == "alpha beta " and stream.stopped
    assert all("#" not in d for d in deltas)
