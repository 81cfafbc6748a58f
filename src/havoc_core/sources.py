"""Where users' training text comes from: text files, JSONL (plain, ``.gz``, ``.zst``), Parquet,
directories of them, or a Hugging Face dataset streamed.

Bad input (not UTF-8, empty, not JSON, no text) is a ``HavocError`` naming the file and line; with
``skip_invalid`` it is left out and counted. ``.zst`` needs ``zstandard`` and ``.parquet``
``pyarrow`` (optional: a one-line hint when missing).
"""

from __future__ import annotations

import gzip
import importlib
import io
import json
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from havoc_core.errors import HavocError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
Progress = Callable[[int], None]  # told how many bytes of the input files each document consumed

SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _decode(data: bytes, path: Path, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data[:e.start].count(b"\n")
        raise HavocError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x})") from None


def _optional(module: str, path: Path) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        package = {"pyarrow.parquet": "pyarrow"}.get(module, module)
        raise HavocError(f"{path}: reading this format needs the `{package}` package: pip install {package}") from None


def _open_binary(path: Path, raw: BinaryIO) -> tuple[BinaryIO, tuple[type[Exception], ...]]:
    """The decompressed bytes of ``raw`` (``path`` opened), chosen by the file's suffix, and the
    exceptions that mean the compressed data is corrupt or cut short."""
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw), (OSError, EOFError, zlib.error)  # type: ignore[return-value]
    if path.name.endswith(".zst"):
        zstandard = _optional("zstandard", path)
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)), (OSError, zstandard.ZstdError)
    return raw, ()


def iter_jsonl(path: str | Path, progress: Progress | None = None) -> Iterator[tuple[str, Any]]:
    """``("file:line", value)`` per non-blank line (of a plain, ``.gz`` or ``.zst`` file), where value
    is the parsed JSON or, for a line that is not UTF-8 or not JSON, the ``HavocError`` saying so
    (the caller raises or skips it). ``progress`` is told the compressed bytes each line took."""
    path = Path(path)
    empty = True
    with open(path, "rb") as raw:
        (lines, corrupt), lineno, done = _open_binary(path, raw), 0, 0
        while True:
            try:
                line = lines.readline()
            except corrupt as e:
                yield f"{path}:{lineno + 1}", HavocError(f"{path}:{lineno + 1}: corrupt compressed data ({e})")
                return
            if not line:
                break
            lineno += 1
            if progress is not None:
                progress(raw.tell() - done)
                done = raw.tell()
            if not line.strip():
                continue
            empty = False
            yield _parse_line(path, lineno, line)
    if empty:
        yield str(path), HavocError(f"{path}: empty file (expected one JSON object per line)")


def _parse_line(path: Path, lineno: int, raw: bytes) -> tuple[str, Any]:
    where = f"{path}:{lineno}"
    try:
        value = json.loads(_decode(raw, path, lineno))
        if SURROGATE_ESCAPE.search(raw):  # a lone one (a pair is one character) is not text
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        return where, value
    except json.JSONDecodeError as e:
        return where, HavocError(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return where, HavocError(f"{where}: JSON nested too deeply")
    except UnicodeEncodeError:
        return where, HavocError(f"{where}: a string holds an unpaired UTF-16 surrogate escape "
                                 "(\\ud800-\\udfff): not text")
    except HavocError as e:
        return where, e


def _parquet_texts(path: Path, text_key: str, progress: Progress | None) -> Iterator[str | HavocError]:
    """One document per row of the ``text_key`` column, read a batch of rows at a time."""
    pq = _optional("pyarrow.parquet", path)
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid / OSError for anything that is not Parquet
        yield HavocError(f"{path}: not a valid Parquet file ({e})")
        return
    names = file.schema_arrow.names
    if text_key not in names:
        yield HavocError(f"{path}: no column {text_key!r} (found {names}; choose one with --text-key)")
        return
    rows, size = max(1, file.metadata.num_rows), path.stat().st_size
    row = 0
    for batch in file.iter_batches(columns=[text_key], batch_size=1024):
        if progress is not None:
            progress(size * batch.num_rows // rows)
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str) and text.strip():
                yield text
            else:
                yield HavocError(f"{path}: row {row}: {text_key}: expected a non-empty string, found {repr(text)[:40]}")
    if row == 0:
        yield HavocError(f"{path}: no rows")


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


def _texts(path: Path, text_key: str, progress: Progress | None = None) -> Iterator[str | HavocError]:
    """One document per text file, per JSONL line, per Parquet row; bad input as a ``HavocError`` value."""
    if path.name.endswith(".parquet"):
        yield from _parquet_texts(path, text_key, progress)
        return
    if not path.name.endswith(JSONL_SUFFIXES):
        try:
            data = path.read_bytes()
            if progress is not None:
                progress(len(data))
            text = _decode(data, path)
        except HavocError as e:
            yield e
            return
        yield text if text.strip() else HavocError(f"{path}: empty file (expected text)")
        return
    for where, record in iter_jsonl(path, progress):
        text = record.get(text_key) if isinstance(record, dict) else None
        if isinstance(record, HavocError):
            yield record
        elif isinstance(text, str) and text.strip():
            yield text
        else:
            found = repr(text)[:40] if isinstance(record, dict) else type(record).__name__
            yield HavocError(f"{where}: expected an object with a non-empty string {text_key!r}, found {found}")


def read_documents(paths: Iterable[str | Path], skip_invalid: bool = False, text_key: str = "text",
                   skipped: list[str] | None = None, progress: Progress | None = None) -> Iterator[str]:
    """Documents from text files (one per file), JSONL files (one ``{"text": ...}`` per line; also
    ``.jsonl.gz`` / ``.jsonl.zst``) and Parquet files (one per row of the ``text_key`` column).

    Bad input (not UTF-8, empty, not JSON, no text) raises ``HavocError`` naming file and line, or
    with ``skip_invalid`` is left out, its message appended to ``skipped`` (or, without that list,
    counted in one line on stderr at the end).
    """
    report = skipped is None
    skipped = [] if skipped is None else skipped
    for path in expand_paths(paths):
        for item in _texts(path, text_key, progress):
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


def hf_documents(spec: str, split: str = "train", text_key: str = "text") -> Iterator[str]:
    """Documents of the Hugging Face dataset ``NAME[:CONFIG]`` (optional ``datasets`` package),
    streamed record by record: nothing is downloaded whole, so ``--max-tokens`` stops it early."""
    try:
        import datasets
    except ImportError:
        raise HavocError("--hf-dataset needs the `datasets` package: pip install datasets") from None
    name, _, config = spec.partition(":")
    try:
        records = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # network, unknown name, bad split: all end the command the same way
        raise HavocError(f"{spec}: cannot load this Hugging Face dataset ({e})") from e

    def texts() -> Iterator[str]:
        for i, record in enumerate(records):
            text = record.get(text_key)
            if not isinstance(text, str):
                raise HavocError(f"{spec}[{i}].{text_key}: expected a string, found {type(text).__name__}")
            if text.strip():
                yield text

    return texts()
