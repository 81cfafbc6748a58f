"""Training data: documents -> uint32 token shards; conversations -> ids + assistant-only loss masks.

A prepared pretraining directory::

    manifest.json              splits, shard files and token counts, vocab size, tokenizer hash
    tokenizer.json (+ config)  the tokenizer that made the shards
    train_00000.bin ...        raw uint32 token ids (70,000 > 65,535), read back with np.memmap
    val_00000.bin

Each document is stored as ``<|bos|> ids <|eos|>``. Documents go to "val" by a seeded coin flip,
whole, so no document is split between train and validation.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from havoc_core.atomic import atomic_open, write_atomic, write_atomic_dir
from havoc_core.errors import HavocError
from havoc_core.sources import iter_jsonl, read_documents, report_skipped
from havoc_core.tokenizer import HavocTokenizer, render_chat

MANIFEST = "manifest.json"
FORMAT = "havoc-token-shards"
DTYPE = np.uint32
SPLITS = ("train", "val")
Example = tuple[list[int], list[int]]


def tokenizer_hash(tok: HavocTokenizer) -> str:
    """Fingerprint of the tokenizer's full definition (vocab, merges, specials)."""
    return hashlib.sha256(tok.to_json().encode()).hexdigest()[:16]


def _documents(sources: Iterable[str | os.PathLike], skip_invalid: bool, skipped: list[str],
               text_key: str) -> Iterator[str]:
    """Texts as given, or, when the sources are paths, the documents in those files."""
    it = iter(sources)
    first = next(it, None)
    if first is None:
        return
    rest = itertools.chain([first], it)
    if isinstance(first, os.PathLike):
        yield from read_documents(rest, skip_invalid, text_key, skipped)  # type: ignore[arg-type]
        return
    for i, text in enumerate(rest):
        if isinstance(text, str) and text.strip():
            yield text
            continue
        error = HavocError(f"document {i}: expected a non-empty string, found {repr(text)[:40]}")
        if not skip_invalid:
            raise error
        skipped.append(str(error))


class _ShardWriter:
    """Appends documents to ``{split}_NNNNN.bin`` files of about ``shard_tokens`` tokens each."""

    def __init__(self, directory: Path, split: str, shard_tokens: int) -> None:
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self._file: BinaryIO | None = None

    def add(self, ids: list[int]) -> None:
        if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            self.close()
            name = f"{self.split}_{len(self.shards):05d}.bin"
            self._file = open(self.directory / name, "wb")
            self.shards.append({"file": name, "tokens": 0})
        self._file.write(np.asarray(ids, dtype=DTYPE).tobytes())
        self.shards[-1]["tokens"] += len(ids)
        self.documents += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self) -> dict[str, Any]:
        return {"documents": self.documents, "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def prepare_pretrain(sources: Iterable[str] | Iterable[os.PathLike], tokenizer: HavocTokenizer, out_dir: str | Path,
                     val_fraction: float = 0.02, *, seed: int = 0, shard_tokens: int = 1 << 27,
                     skip_invalid: bool = False, show_progress: bool = True, batch_size: int = 256,
                     text_key: str = "text", name: str = "") -> dict[str, Any]:
    """Tokenize documents (strings, or text/JSONL file paths) into uint32 shards in ``out_dir``
    (written atomically), with a whole-document train/val split; returns the manifest."""
    if not 0.0 <= val_fraction < 1.0:
        raise HavocError(f"val_fraction: expected a number in [0, 1), found {val_fraction}")
    skipped: list[str] = []
    manifest: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        rng = random.Random(seed)
        writers = {split: _ShardWriter(tmp, split, shard_tokens) for split in SPLITS}
        docs = _documents(sources, skip_invalid, skipped, text_key)
        held: list[int] | None = None  # the latest document: the val split's fallback if it stays empty
        with tqdm(desc="tokenizing", unit=" docs", disable=not show_progress, file=sys.stderr) as bar:
            while batch := list(itertools.islice(docs, batch_size)):
                for body in tokenizer.encode_batch(batch):
                    if held is not None:
                        writers["val" if rng.random() < val_fraction else "train"].add(held)
                    held = [tokenizer.bos_id, *body, tokenizer.eos_id]
                bar.update(len(batch))
                bar.set_postfix(tokens=f"{sum(w.summary()['tokens'] for w in writers.values()):,}")
        if held is None:
            why = f" ({len(skipped)} skipped as invalid, first: {skipped[0]})" if skipped else ""
            raise HavocError(f"{name or 'inputs'}: no documents to tokenize{why}")
        # the last document goes to val if the coin says so, or if val would otherwise be empty
        val_empty, train_empty = writers["val"].documents == 0, writers["train"].documents == 0
        to_val = val_fraction > 0 and (val_empty or (rng.random() < val_fraction and not train_empty))
        if to_val and train_empty:
            raise HavocError(f"{name or 'inputs'}: only 1 document, so no validation split can be held out; "
                             "give more documents or val_fraction 0")
        writers["val" if to_val else "train"].add(held)
        for w in writers.values():
            w.close()
        manifest.update({
            "format": FORMAT, "dtype": "uint32", "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "tokenizer_hash": tokenizer_hash(tokenizer),
            "val_fraction": val_fraction, "seed": seed, "skipped": len(skipped),
            "splits": {split: w.summary() for split, w in writers.items()},
        })
        tokenizer.save(tmp)
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    write_atomic_dir(Path(out_dir), write)
    report_skipped(skipped, "inputs")
    return manifest


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
