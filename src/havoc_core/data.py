"""Training data: documents -> uint32 token shards; conversations -> ids + assistant-only loss masks.

A prepared pretraining directory::

    manifest.json              splits, shard files and token counts, vocab size, tokenizer hash
    tokenizer.json (+ config)  the tokenizer that made the shards
    train_00000.bin ...        raw uint32 token ids (70,000 > 65,535), read back with np.memmap
    val_00000.bin

Each document is stored as ``<|bos|> ids <|eos|>``. Documents go to "val" by a seeded coin flip,
whole, so no document is split between train and validation. ``prepare.py`` writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from havoc_core.atomic import atomic_open
from havoc_core.errors import HavocError
from havoc_core.sources import iter_jsonl, report_skipped
from havoc_core.tokenizer import HavocTokenizer, render_chat

MANIFEST = "manifest.json"
FORMAT = "havoc-token-shards"
DTYPE = np.uint32
SPLITS = ("train", "val")
Example = tuple[list[int], list[int]]


def tokenizer_hash(tok: HavocTokenizer) -> str:
    """Fingerprint of the tokenizer's full definition (vocab, merges, specials)."""
    return hashlib.sha256(tok.to_json().encode()).hexdigest()[:16]


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise HavocError(f"{path}: no such file (a data dir is made by `havoc prepare`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HavocError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise HavocError(f"{path}: format: expected {FORMAT!r}, found {found!r}")
    return manifest


def open_split(data_dir: str | Path, split: str) -> list[np.memmap]:
    """The split's shards as read-only 1-D uint32 memmaps; HavocError if anything is missing or
    does not match the manifest."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise HavocError(f"{data_dir / MANIFEST}: splits: expected a {split!r} split, found {sorted(splits)}")
    out = []
    for shard in splits[split]["shards"]:
        path = data_dir / shard["file"]
        if not path.is_file():
            raise HavocError(f"{path}: shard listed in {MANIFEST} is missing")
        size, expected = path.stat().st_size, shard["tokens"] * DTYPE().itemsize
        if size != expected:
            raise HavocError(f"{path}: expected {expected} bytes ({shard['tokens']} uint32 tokens as {MANIFEST} says), "
                             f"found {size}")
        if shard["tokens"]:
            out.append(np.memmap(path, dtype=DTYPE, mode="r"))
    return out


# --------------------------------------------------------------------------- conversations

def write_jsonl(records: Iterable[Any], path: str | Path) -> Path:
    """One JSON value per line, UTF-8, written atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return Path(path)


def _records(source: str | Path | Iterable[Any]) -> Iterator[tuple[str, Any]]:
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_file():
            raise HavocError(f"{source}: no such conversations file")
        yield from iter_jsonl(source)
    else:
        for i, record in enumerate(source):
            yield f"conversation {i}", record


def conversation_example(record: Any, tokenizer: HavocTokenizer, max_len: int, where: str) -> Example:
    """``(ids, mask)`` of one ``{"messages": [...]}`` record, or HavocError naming ``where``."""
    if isinstance(record, HavocError):
        raise record
    if not isinstance(record, dict) or "messages" not in record:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise HavocError(f"{where}: expected an object with \"messages\", found {found}")
    messages = record["messages"]
    chars = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)) \
        if isinstance(messages, list) else 0
    if chars > max_len * tokenizer.max_token_chars:
        raise HavocError(f"{where}: {chars} characters, more than max_len {max_len} tokens can hold "
                         "(conversations are never truncated: shorten it or use --skip-invalid)")
    try:
        ids, mask = render_chat(tokenizer, record["messages"])
    except HavocError as e:
        raise HavocError(f"{where}: {e}") from None
    if not any(m["role"] == "assistant" for m in record["messages"]):
        raise HavocError(f"{where}: messages: expected at least one assistant turn to learn from, found none")
    if len(ids) > max_len:
        raise HavocError(f"{where}: {len(ids)} tokens, longer than max_len {max_len} "
                         "(conversations are never truncated: shorten it or use --skip-invalid)")
    return ids, mask


def load_conversations(source: str | Path | Iterable[Any], tokenizer: HavocTokenizer, max_len: int,
                       skip_invalid: bool = False, skipped: list[str] | None = None) -> list[Example]:
    """``(ids, loss mask)`` per conversation from a JSONL file or a list of records.

    Bad records (not JSON, unknown roles, no assistant turn, longer than ``max_len``) raise
    ``HavocError`` naming the file and line; with ``skip_invalid`` they are left out, their
    messages appended to ``skipped`` (or, without that list, counted in one line on stderr).
    """
    report = skipped is None
    skipped = [] if skipped is None else skipped
    examples = []
    for where, record in _records(source):
        try:
            examples.append(conversation_example(record, tokenizer, max_len, where))
        except HavocError as e:
            if not skip_invalid:
                raise
            skipped.append(str(e))
    if report:
        report_skipped(skipped, "conversations")
    return examples


def prepare_conversations(source: str | Path | Iterable[Any], tokenizer: HavocTokenizer, max_len: int,
                          out: str | Path, skip_invalid: bool = False) -> dict[str, Any]:
    """Check every conversation against the tokenizer and ``max_len`` and write the valid ones to
    the JSONL file ``out`` (what ``havoc sft --data`` reads); returns counts."""
    kept, skipped, longest, assistant_tokens = [], [], 0, 0
    for where, record in _records(source):
        try:
            ids, mask = conversation_example(record, tokenizer, max_len, where)
        except HavocError as e:
            if not skip_invalid:
                raise
            skipped.append(str(e))
            continue
        kept.append(record)
        longest, assistant_tokens = max(longest, len(ids)), assistant_tokens + sum(mask)
    if not kept:
        raise HavocError(f"{source if isinstance(source, (str, os.PathLike)) else 'conversations'}: "
                         "no valid conversations")
    write_jsonl(kept, out)
    report_skipped(skipped, "conversations")
    return {"conversations": len(kept), "skipped": len(skipped), "longest": longest,
            "assistant_tokens": assistant_tokens}
