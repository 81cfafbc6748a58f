"""``havoc-docs``: a built-in, offline multiple-choice task about the standard library's documented behaviour.

Each item asks "What does `json.dumps` do?" and offers four first sentences of docstrings: the right one
and three from other modules. The facts are in the built-in pretraining text; a tenth of the names,
chosen by a stable hash (``builtin_corpus.held_out``: sha256 of the name, modulo 10, equal to 0), never appear in
the built-in SFT conversations, and only those make the ``test`` split. Chance is 25%.

An item is scored as a chat turn: the user's ``question``, then the assistant's reply starting with
``answer_prefix`` (the object's name and signature, the way the SFT answers begin), continued by each
choice (which starts with the blank line that follows the prefix). :func:`item_requests` gives the
``(context ids, continuation ids)`` pairs in that form.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re

import torch
import torch.nn.functional as F

from havoc_core.builtin_corpus import DocEntry, builtin_entries, held_out
from havoc_core.model import HavocModel
from havoc_core.tokenizer import HavocTokenizer, render_chat

KINDS = ("class", "function", "method")
SPLITS = ("test", "train")
NUM_CHOICES = 4
_SENTENCE = re.compile(r"(.+?[.!?])(?:\s|$)")


def first_sentence(doc: str) -> str | None:
    """The docstring's first sentence if it reads as a description (15-200 characters), else None."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = _SENTENCE.match(para)
    sentence = m.group(1) if m else ""
    return sentence if 15 <= len(sentence) <= 200 and sentence[0].isalpha() else None


@dataclasses.dataclass(frozen=True)
class DocsItem:
    """One question: ``choices[gold]`` is the right continuation of ``answer_prefix``."""

    name: str
    question: str
    answer_prefix: str
    choices: tuple[str, ...]
    gold: int


def _candidates() -> list[tuple[DocEntry, str]]:
    out = []
    for e in builtin_entries():
        if e.kind in KINDS and not any(p.startswith("_") for p in e.name.split(".")):
            sentence = first_sentence(e.doc)
            if sentence:
                out.append((e, sentence))
    return out


@functools.lru_cache(maxsize=2)
def docs_items(split: str = "test") -> tuple[DocsItem, ...]:
    """The items of ``split`` ("test": held-out names; "train": the rest), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"havoc-docs: split must be one of {SPLITS}, got {split!r}")
    candidates = _candidates()
    pool = sorted({s for _, s in candidates})
    items = []
    for e, sentence in candidates:
        if held_out(e.name) != (split == "test"):
            continue
        rng = random.Random(e.name)  # str seeds hash with sha512: stable across runs and machines
        others = {s for other, s in candidates if other.module == e.module}
        distractors: list[str] = []
        while len(distractors) < NUM_CHOICES - 1:
            s = rng.choice(pool)
            if s not in others and s not in distractors:
                distractors.append(s)
        gold = rng.randrange(NUM_CHOICES)
        choices = [f"\n\n{s}" for s in distractors]
        choices.insert(gold, f"\n\n{sentence}")
        items.append(DocsItem(e.name, f"What does `{e.name}` do?", f"`{e.title}`", tuple(choices), gold))
    return tuple(items)


def item_requests(tok: HavocTokenizer, item: DocsItem) -> list[tuple[list[int], list[int]]]:
    """``(context, continuation)`` token ids for each choice, the context a rendered chat turn.

    The prefix and each choice are encoded together and split where the prefix ends (what
    lm-evaluation-harness does), so the choice's tokens are the ones the model would produce."""
    context, _ = render_chat(tok, [{"role": "user", "content": item.question}], add_generation_prompt=True)
    prefix = tok.encode(item.answer_prefix)
    requests = []
    for choice in item.choices:
        whole = tok.encode(item.answer_prefix + choice)
        split = len(prefix)
        while split > 0 and whole[:split] != prefix[:split]:  # a merge across the boundary: back off
            split -= 1
        requests.append((context + whole[:split], whole[split:]))
    return requests


NEUTRAL_QUESTION, NEUTRAL_PREFIX = "What does it do?", "`it`"


def neutral(item: DocsItem) -> DocsItem:
    """The same choices after a question that names nothing: what each choice scores by its form alone."""
    return dataclasses.replace(item, question=NEUTRAL_QUESTION, answer_prefix=NEUTRAL_PREFIX)


@torch.no_grad()
def _loglikelihoods(model: HavocModel, tok: HavocTokenizer, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """Summed fp32 log-probability of each continuation after its context, in one padded batch;
    a context longer than the model's window loses its first tokens (as lm-evaluation-harness does)."""
    keep = model.config.max_seq_len + 1
    pairs = [((c + x)[-keep:][: max(1, min(keep, len(c) + len(x)) - len(x))], x) for c, x in pairs]
    width = max(len(c) + len(x) for c, x in pairs) - 1
    ids = torch.full((len(pairs), width), tok.pad_id, dtype=torch.long)
    for row, (c, x) in enumerate(pairs):
        ids[row, :len(c) + len(x) - 1] = torch.tensor(c + x[:-1])
    logp = F.log_softmax(model(ids).float(), dim=-1)
    return [logp[row, len(c) - 1:len(c) + len(x) - 1].gather(-1, torch.tensor(x)[:, None]).sum().item()
            for row, (c, x) in enumerate(pairs)]


def docs_scores(model: HavocModel, tok: HavocTokenizer, items: tuple[DocsItem, ...],
                batch_items: int = 4) -> dict[str, float]:
    """Two of lm-evaluation-harness's metrics over ``items``.

    ``acc``: the right choice has the highest log-likelihood. ``acc_mutual_info``: the highest
    log p(choice | question) - log p(choice | a question that names nothing), i.e. how much the
    name raised it. The choices are first sentences of unrelated docstrings, whose lengths and
    wording alone swing plain log-likelihood by more than a small model's knowledge does (surface
    form competition, Holtzman et al. 2021); the difference cancels that and keeps what the model
    knows about the name."""
    hits = {"acc": 0, "acc_mutual_info": 0}
    for start in range(0, len(items), batch_items):
        chunk = items[start:start + batch_items]
        pairs = [p for item in chunk for p in item_requests(tok, item) + item_requests(tok, neutral(item))]
        sums = _loglikelihoods(model, tok, pairs)
        for k, item in enumerate(chunk):
            row = sums[2 * k * NUM_CHOICES:2 * (k + 1) * NUM_CHOICES]
            named, plain = row[:NUM_CHOICES], row[NUM_CHOICES:]
            hits["acc"] += max(range(NUM_CHOICES), key=named.__getitem__) == item.gold
            hits["acc_mutual_info"] += max(range(NUM_CHOICES), key=lambda i: named[i] - plain[i]) == item.gold
    return {k: v / max(1, len(items)) for k, v in hits.items()}
