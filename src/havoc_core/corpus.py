"""Where training text comes from: your files, a Hugging Face dataset, or the built-in corpus.

The built-in corpus needs no download: the documentation every Python install carries
(``pydoc_data`` topics and the standard library's docstrings), gathered in sorted order so the
same interpreter always gives the same list, plus conversations generated from it for SFT.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import json
import pkgutil
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from havoc_core.errors import HavocError

# --------------------------------------------------------------------------- user files


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
                yield where, json.loads(_decode(raw, path, lineno))
            except json.JSONDecodeError as e:
                yield where, HavocError(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
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
        if isinstance(record, HavocError) or (isinstance(text, str) and text.strip()):
            yield record if isinstance(record, HavocError) else text
        else:
            found = repr(text)[:40] if isinstance(record, dict) else type(record).__name__
            yield HavocError(f"{where}: expected an object with a non-empty string {text_key!r}, found {found}")


def read_documents(paths: Iterable[str | Path], skip_invalid: bool = False, text_key: str = "text",
                   skipped: list[str] | None = None) -> Iterator[str]:
    """Documents from text files (one per file) and ``.jsonl`` files (one ``{"text": ...}`` per line).

    Bad input (not UTF-8, empty, not JSON, no text) raises ``HavocError`` naming file and line, or
    with ``skip_invalid`` is left out and its message appended to ``skipped``.
    """
    for path in expand_paths(paths):
        for item in _texts(path, text_key):
            if isinstance(item, str):
                yield item
            elif not skip_invalid:
                raise item
            elif skipped is not None:
                skipped.append(str(item))


def hf_documents(name: str, split: str = "train", text_key: str = "text") -> Iterator[str]:
    """Documents of a Hugging Face ``datasets`` dataset (optional dependency; may download)."""
    try:
        import datasets
    except ImportError:
        raise HavocError("--hf-dataset needs the `datasets` package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # network, unknown name, bad split: all end the command the same way
        raise HavocError(f"{name}: cannot load this Hugging Face dataset ({e})") from e
    for i, record in enumerate(ds):
        text = record.get(text_key)
        if not isinstance(text, str):
            raise HavocError(f"{name}[{i}].{text_key}: expected a string, found {type(text).__name__}")
        if text.strip():
            yield text


# --------------------------------------------------------------------------- built-in documents

# Modules not imported: side effects on import (this, antigravity, turtle), GUI toolkits, test
# suites, slow or deprecated bundles, or ones whose contents depend on what else is installed.
SKIP_MODULES = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "tests", "idle_test",
    "lib2to3", "ensurepip", "distutils", "pydoc_data", "readline", "encodings", "xxlimited", "xxsubtype",
    "msilib", "winreg", "winsound", "msvcrt", "nt",
})


@dataclass(frozen=True)
class DocEntry:
    """One documented thing: a pydoc topic, or a standard-library module, class, function or method."""

    kind: str  # "topic", "module", "class", "function" or "method"
    name: str  # "json.dumps", or a topic's label such as "assert"
    title: str  # a topic's heading, or the object's name with its signature
    doc: str
    module: str = ""


def _import(name: str) -> ModuleType | None:
    """The module, or None when it fails to import; its warnings and prints are swallowed."""
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except (Exception, SystemExit):
            return None


def _stdlib_modules() -> list[ModuleType]:
    """Public standard-library modules and their public submodules, sorted by name."""
    found: list[ModuleType] = []

    def visit(name: str) -> None:
        module = _import(name)
        if module is None or module.__name__ != name:  # os.path is posixpath: documented once
            return
        found.append(module)
        for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", [])), key=lambda i: i.name):
            if not info.name.startswith("_") and info.name not in SKIP_MODULES:
                visit(f"{name}.{info.name}")

    for name in sorted(sys.stdlib_module_names):
        if not name.startswith("_") and name not in SKIP_MODULES:
            visit(name)
    return found


def _own_doc(obj: Any) -> str:
    """The object's own docstring, cleaned (no inheritance: that would repeat one doc many times)."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


class _Elided:
    def __repr__(self) -> str:
        return "..."


def _signature(obj: Any) -> str:
    """``(a, b=1)``; defaults that are not short literals print as ``...`` (sentinels print their
    address, mutable defaults their current state: either would make the corpus vary)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = []
    for p in sig.parameters.values():
        if p.default is not p.empty and not (isinstance(p.default, (int, float, str, bytes, bool, type(None)))
                                             and len(repr(p.default)) <= 40):
            p = p.replace(default=_Elided())
        params.append(p)
    return str(sig.replace(parameters=params, return_annotation=sig.empty))


def _module_entries(module: ModuleType, seen: set[int]) -> list[DocEntry]:
    name = module.__name__
    entries = [DocEntry("module", name, f"module {name}", _own_doc(module), name)]
    for attr, obj in sorted(vars(module).items()):
        is_callable = inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)
        if attr.startswith("_") or not is_callable or getattr(obj, "__module__", None) != name or id(obj) in seen:
            continue
        seen.add(id(obj))
        kind = "class" if inspect.isclass(obj) else "function"
        entries.append(DocEntry(kind, f"{name}.{attr}", f"{name}.{attr}{_signature(obj)}", _own_doc(obj), name))
        if kind == "class":
            for mname, member in sorted(vars(obj).items()):
                func = getattr(member, "__func__", member)  # classmethod / staticmethod
                # C methods have no __module__; a method patched in by a third-party library has its own
                if mname.startswith("_") or not callable(func) or getattr(func, "__module__", None) not in (None, name):
                    continue
                qual = f"{name}.{attr}.{mname}"
                entries.append(DocEntry("method", qual, f"{qual}{_signature(func)}", _own_doc(func), name))
    return [e for e in entries if e.doc]


def _topic_entries() -> list[DocEntry]:
    from pydoc_data.topics import topics

    entries = []
    for label in sorted(topics):
        heading, _, body = topics[label].strip().partition("\n")
        body = body.lstrip("*\n") if body.startswith("*") else body
        entries.append(DocEntry("topic", label, heading.strip(), body.strip()))
    return entries


@functools.lru_cache(maxsize=1)
def builtin_entries() -> tuple[DocEntry, ...]:
    """Every documented pydoc topic and standard-library object, in a fixed order."""
    seen: set[int] = set()
    entries = _topic_entries()
    for module in _stdlib_modules():
        entries += _module_entries(module, seen)
    return tuple(entries)


def _indent(text: str) -> str:
    return "\n".join("    " + line if line else "" for line in text.splitlines())


def builtin_documents() -> list[str]:
    """The built-in pretraining corpus: one document per pydoc topic and per module."""
    docs: list[str] = []
    module_parts: dict[str, list[str]] = {}
    for e in builtin_entries():
        if e.kind == "topic":
            docs.append(f"{e.title}\n\n{e.doc}")
        elif e.kind == "module":
            module_parts.setdefault(e.module, []).append(f"{e.title}\n\n{e.doc}")
        else:
            module_parts.setdefault(e.module, []).append(f"{e.kind} {e.title}\n{_indent(e.doc)}")
    docs += ["\n\n".join(parts) for _, parts in sorted(module_parts.items())]
    return docs
