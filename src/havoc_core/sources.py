"""Where users' training text comes from: text files, JSONL, directories, or a Hugging Face dataset.

Bad input (not UTF-8, empty, not JSON, no text) is a ``HavocError`` naming the file and line; with
``skip_invalid`` it is left out and counted.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from havoc_core.errors import HavocError

SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _decode(data: bytes, path: Path, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data[:e.start].count(b"\n")
        raise HavocError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x})") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``("file:line", value)`` per non-blank line, where value is the parsed JSON or, for a line
    that is not UTF-8 or not JSON, the ``HavocError`` saying so (the caller raises or skips it)."""
    path = Path(path)
    empty = True
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            empty = False
            where = f"{path}:{lineno}"
            try:
                value = json.loads(_decode(raw, path, lineno))
                if SURROGATE_ESCAPE.search(raw):  # a lone one (a pair is one character) is not text
                    json.dumps(value, ensure_ascii=False).encode("utf-8")
                yield where, value
            except json.JSONDecodeError as e:
                yield where, HavocError(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            except RecursionError:
                yield where, HavocError(f"{where}: JSON nested too deeply")
            except UnicodeEncodeError:
                yield where, HavocError(f"{where}: a string holds an unpaired UTF-16 surrogate escape "
                                        "(\\ud800-\\udfff): not text")
            except HavocError as e:
                yield where, e
    if empty:
        yield str(path), HavocError(f"{path}: empty file (expected one JSON object per line)")


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; a directory stands for every file under it, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise HavocError(f"{p}: no such file or directory")
    return out


def _texts(path: Path, text_key: str) -> Iterator[str | HavocError]:
    """One document per text file, one per JSONL line; bad input as a ``HavocError`` value."""
    if path.suffix != ".jsonl":
        try:
            text = _decode(path.read_bytes(), path)
        except HavocError as e:
            yield e
            return
        yield text if text.strip() else HavocError(f"{path}: empty file (expected text)")
        return
    for where, record in iter_jsonl(path):
        text = record.get(text_key) if isinstance(record, dict) else None
        if isinstance(record, HavocError):
            yield record
        elif isinstance(text, str) and text.strip():
            yield text
        else:
            found = repr(text)[:40] if isinstance(record, dict) else type(record).__name__
            yield HavocError(f"{where}: expected an object with a non-empty string {text_key!r}, found {found}")


def read_documents(paths: Iterable[str | Path], skip_invalid: bool = False, text_key: str = "text",
                   skipped: list[str] | None = None) -> Iterator[str]:
    """Documents from text files (one per file) and ``.jsonl`` files (one ``{"text": ...}`` per line).

    Bad input (not UTF-8, empty, not JSON, no text) raises ``HavocError`` naming file and line, or
    with ``skip_invalid`` is left out, its message appended to ``skipped`` (or, without that list,
    counted in one line on stderr at the end).
    """
    report = skipped is None
    skipped = [] if skipped is None else skipped
    for path in expand_paths(paths):
        for item in _texts(path, text_key):
            if isinstance(item, str):
                yield item
            elif not skip_invalid:
                raise item
            else:
                skipped.append(str(item))
    if report:
        report_skipped(skipped, "inputs")


def report_skipped(skipped: list[str], what: str) -> None:
    """The ``--skip-invalid`` summary: how many were left out, and the first reason."""
    if skipped:
        print(f"skipped {len(skipped)} invalid {what} (first: {skipped[0]})", file=sys.stderr)


def hf_documents(name: str, split: str = "train", text_key: str = "text") -> Iterator[str]:
    """Documents of a Hugging Face ``datasets`` dataset (optional dependency; may download)."""
    try:
        import datasets
    except ImportError:
        raise HavocError("--hf-dataset needs the `datasets` package: pip install datasets") from None
    try:
        records = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # network, unknown name, bad split: all end the command the same way
        raise HavocError(f"{name}: cannot load this Hugging Face dataset ({e})") from e

    def texts() -> Iterator[str]:
        for i, record in enumerate(records):
            text = record.get(text_key)
            if not isinstance(text, str):
                raise HavocError(f"{name}[{i}].{text_key}: expected a string, found {type(text).__name__}")
            if text.strip():
                yield text

    return texts()
