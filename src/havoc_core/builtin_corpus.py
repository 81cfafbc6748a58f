"""The built-in corpus, which needs no download: the documentation every Python install carries
(``pydoc_data`` topics and the standard library's docstrings), gathered in sorted order so the same
interpreter always gives the same list, plus SFT conversations generated from it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import io
import pkgutil
import pydoc
import random
import re
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pydoc_data.topics import topics as pydoc_topics
from types import ModuleType
from typing import Any

# Modules not imported: side effects on import (this, antigravity, turtle), GUI toolkits, test
# suites, slow or deprecated bundles, or ones whose contents depend on what else is installed.
SKIP_MODULES = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "tests", "idle_test",
    "lib2to3", "ensurepip", "distutils", "pydoc_data", "readline", "encodings", "xxlimited", "xxsubtype",
    "msilib", "winreg", "winsound", "msvcrt", "nt",
})


@dataclasses.dataclass(frozen=True)
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
    except Exception:  # C signatures can fail in many ways (TypeError, ValueError, AttributeError...)
        return ""
    params = []
    for p in sig.parameters.values():
        if p.default is not p.empty and not (isinstance(p.default, (int, float, str, bytes, bool, type(None)))
                                             and len(repr(p.default)) <= 40):
            p = p.replace(default=_Elided())
        params.append(p)
    return str(sig.replace(parameters=params, return_annotation=sig.empty))


def _defined_in(obj: Any, name: str) -> bool:
    """Whether module ``name`` is where users find ``obj``: its own module, or the public face of
    the C module that implements it (``_functools.reduce`` is ``functools.reduce``, posix's ``os``)."""
    home = getattr(obj, "__module__", None)
    return home in (name, "_" + name) or (name == "os" and home == "posix")


def _module_entries(module: ModuleType, seen: set[int]) -> list[DocEntry]:
    name = module.__name__
    entries = [DocEntry("module", name, f"module {name}", _own_doc(module), name)]
    for attr, obj in sorted(vars(module).items()):
        obj = vars(module).get(f"__{attr}__", obj)  # sys.excepthook & co. may be replaced (pytest does): originals
        is_callable = inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)
        if attr.startswith("_") or not is_callable or not _defined_in(obj, name) or id(obj) in seen:
            continue
        seen.add(id(obj))
        kind = "class" if inspect.isclass(obj) else "function"
        entries.append(DocEntry(kind, f"{name}.{attr}", f"{name}.{attr}{_signature(obj)}", _own_doc(obj), name))
        if kind == "class":
            for mname, member in sorted(vars(obj).items()):
                func = getattr(member, "__func__", member)  # classmethod / staticmethod
                # C methods have no __module__; a method patched in by a third-party library has its own
                if mname.startswith("_") or not callable(func) or getattr(func, "__module__", None) not in (
                        None, obj.__module__):
                    continue
                qual = f"{name}.{attr}.{mname}"
                entries.append(DocEntry("method", qual, f"{qual}{_signature(func)}", _own_doc(func), name))
    return [e for e in entries if e.doc]


def _topic_entries() -> list[DocEntry]:
    entries = []
    for label in sorted(pydoc_topics):
        heading, _, body = pydoc_topics[label].strip().partition("\n")
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


def builtin_documents(digest: bool = False) -> list[str]:
    """The built-in pretraining corpus: one document per pydoc topic and per module.

    ``digest``: each object's signature and first paragraph only, and each topic's first 1,500
    characters -- a quarter of the text, so a few minutes of CPU see it several times (the demo)."""
    docs: list[str] = []
    module_parts: dict[str, list[str]] = {}
    for e in builtin_entries():
        doc = e.doc.strip().split("\n\n")[0] if digest else e.doc
        if e.kind == "topic":
            docs.append(f"{e.title}\n\n{e.doc[:1500] if digest else e.doc}")
        elif e.kind == "module":
            module_parts.setdefault(e.module, []).append(f"{e.title}\n\n{doc}")
        else:
            module_parts.setdefault(e.module, []).append(f"{e.kind} {e.title}\n{_indent(doc)}")
    docs += ["\n\n".join(parts) for _, parts in sorted(module_parts.items())]
    return docs


# --------------------------------------------------------------------------- built-in conversations

SYSTEM_PROMPTS = (
    "You are HAVOC, a small assistant that answers questions about Python.",
    "You are a helpful assistant. Answer from the Python documentation.",
    "Answer briefly and accurately.",
)
GREETINGS = (
    ("Hello!", "Hello! I am HAVOC, a small language model trained on Python's documentation. "
               "Ask me about a Python keyword, module or function."),
    ("Who are you?", "I am HAVOC, a small decoder-only language model. I was trained on the documentation "
                     "that ships with Python, so I am best at questions about the language and its standard library."),
    ("What can you do?", "I can explain Python keywords, statements, built-in types and standard-library modules, "
                         "classes and functions, quoting their documentation."),
    ("Thanks!", "You are welcome!"),
    ("hi", "Hi! What would you like to know about Python?"),
)
QUESTIONS = {
    "topic": ("What does the Python documentation say about {title}?", "Explain {title} in Python.",
              "Tell me about {title}."),
    "keyword": ("What does the `{name}` keyword do in Python?", "How is `{name}` used in Python?",
                "Explain the Python keyword {name}."),
    "module": ("What is the `{name}` module for?", "What does the Python module {name} provide?",
               "Tell me about the {name} module."),
    "class": ("What is `{name}`?", "Tell me about the class {name}.", "What is the {short} class in {module}?"),
    "function": ("What does `{name}` do?", "How do I use {name}?", "What is {short}() in the {module} module?"),
    "method": ("What does the method `{name}` do?", "Explain {name}.", "What does {short}() do?"),
}
FOLLOW_UPS = ("And what about `{name}`?", "What does `{name}` do?", "How about {name}?")


def held_out(name: str) -> bool:
    """Whether ``name`` is held out of the conversations (for the havoc-docs test split): sha256 of the
    name, modulo 10, is 0 -- fixed by the text alone, on every machine."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10 == 0


def trim(text: str, limit: int) -> str:
    """At most ``limit`` characters of ``text``, ending at a paragraph or sentence, never mid-word."""
    out = ""
    for para in re.split(r"\n\s*\n", text.strip()):
        joined = f"{out}\n\n{para}" if out else para
        if len(joined) > limit:
            break
        out = joined
    if out:
        return out
    head = text[:limit]
    end = max(head.rfind(". "), head.rfind(".\n")) + 1 or head.rfind("\n") + 1 or head.rfind(" ")
    return head[:end].rstrip() if end > 0 else head


def _keyword_topics() -> list[tuple[str, str]]:
    """``(keyword, topic label)`` pairs from pydoc's help index."""
    pairs = []
    for keyword, target in sorted(pydoc.Helper.keywords.items()):
        while isinstance(target, str) and target in pydoc.Helper.keywords:  # "elif" -> "if"
            target = pydoc.Helper.keywords[target]
        if isinstance(target, str) and target in pydoc.Helper.topics:  # "and" -> "BOOLEAN"
            target = pydoc.Helper.topics[target]
        label = target[0] if isinstance(target, tuple) else target
        if label:
            pairs.append((keyword, label))
    return pairs


def _qa(rng: random.Random, e: DocEntry, limit: int, kind: str | None = None) -> tuple[str, str]:
    """A question about ``e`` and its documentation as the answer."""
    kind = kind or e.kind
    parent, _, short = e.name.rpartition(".")
    question = rng.choice(QUESTIONS[kind]).format(title=e.title, name=e.name, short=short, module=e.module or parent)
    doc = trim(e.doc, limit)
    if kind in ("class", "function", "method"):
        return question, f"`{e.title}`\n\n{doc}"
    return question, doc


def builtin_conversations(seed: int = 0, answer_chars: int = 700) -> list[dict[str, Any]]:
    """Thousands of ``{"messages": [...]}`` SFT conversations from the built-in documentation.

    One per pydoc topic, keyword and documented public standard-library object, except the names
    :func:`held_out` keeps for evaluation (answers trimmed
    to ``answer_chars``, so a conversation fits in 512 tokens of an 8192-token vocab); some with a
    system prompt, some with a follow-up question about a neighbour from the same module.
    Deterministic for a given ``seed`` and Python; shuffled.
    """
    rng = random.Random(seed)
    entries = builtin_entries()
    topics = {e.name: e for e in entries if e.kind == "topic"}
    public = [e for e in entries if e.kind != "topic" and len(e.doc) >= 40 and not held_out(e.name)
              and not any(part.startswith("_") for part in e.name.split("."))]
    items: list[tuple[DocEntry, str]] = [(e, "topic") for e in topics.values()]
    items += [(dataclasses.replace(topics[label], name=kw), "keyword")
              for kw, label in _keyword_topics() if label in topics]
    items += [(e, e.kind) for e in public]
    by_module: dict[str, list[DocEntry]] = {}
    for e in public:
        by_module.setdefault(e.module, []).append(e)

    conversations = []
    for e, kind in items:
        messages = []
        if rng.random() < 0.25:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        neighbours = [n for n in by_module.get(e.module, []) if n is not e] if kind != "keyword" else []
        if neighbours and rng.random() < 0.2:  # multi-turn: two shorter answers
            other = rng.choice(neighbours)
            question, answer = _qa(rng, e, answer_chars // 2, kind)
            _, other_answer = _qa(rng, other, answer_chars // 2)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer},
                         {"role": "user", "content": rng.choice(FOLLOW_UPS).format(name=other.name)},
                         {"role": "assistant", "content": other_answer}]
        else:
            question, answer = _qa(rng, e, answer_chars, kind)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        conversations.append({"messages": messages})
    for question, answer in GREETINGS:
        for system in (None, *SYSTEM_PROMPTS):
            head = [{"role": "system", "content": system}] if system else []
            conversations.append({"messages": [*head, {"role": "user", "content": question},
                                               {"role": "assistant", "content": answer}]})
    rng.shuffle(conversations)
    return conversations
