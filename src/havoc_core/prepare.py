"""Documents -> uint32 token shards: on every core, resumable, byte-identical whatever the worker count.

The main process reads documents in order and makes every choice that depends on order (dedup,
the train/val coin, shard boundaries, ``max_tokens``); worker processes only turn batches of texts
into ids, and their results are used in the order the batches were sent, so ``workers=3`` writes
the bytes ``workers=1`` writes. At most ``2 x workers`` batches are in flight: memory stays flat
whatever the corpus size.

An unfinished run lives in ``.OUT.partial/``. Each time a shard fills, ``progress.json`` there is
rewritten atomically (the options, the documents consumed, the coin's state, every shard's length);
``resume=True`` cuts the shards back to those lengths, reads past the documents already consumed
and goes on. Done, the directory is renamed to ``OUT`` (the format is in ``data.py``).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import xxhash
from tqdm import tqdm

from havoc_core.atomic import publish_dir, write_atomic
from havoc_core.data import DTYPE, FORMAT, MANIFEST, SPLITS, tokenizer_hash
from havoc_core.errors import HavocError
from havoc_core.sources import expand_paths, read_documents, report_skipped
from havoc_core.tokenizer import HavocTokenizer

PROGRESS = "progress.json"
BATCH_DOCS, BATCH_CHARS = 256, 1 << 22  # a batch ends at whichever comes first
Batch = tuple[list[str], int]  # texts, and the count of source documents consumed once they are used


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def dedup_key(text: str) -> int:
    """Exact-duplicate key: a 128-bit hash of the text with case and whitespace runs normalised."""
    return xxhash.xxh3_128_intdigest(" ".join(text.lower().split()).encode("utf-8", "surrogatepass"))


class _ShardWriter:
    """Appends documents to ``{split}_NNNNN.bin`` files of about ``shard_tokens`` tokens each."""

    def __init__(self, directory: Path, split: str, shard_tokens: int) -> None:
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self.completed = 0  # shards filled since the last progress save
        self._file: BinaryIO | None = None

    def add(self, doc: np.ndarray) -> None:
        if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            if self._file is not None:
                self.completed += 1
            self.close()
            name = f"{self.split}_{len(self.shards):05d}.bin"
            self._file = open(self.directory / name, "wb")
            self.shards.append({"file": name, "tokens": 0})
        self._file.write(doc.tobytes())
        self.shards[-1]["tokens"] += len(doc)
        self.documents += 1

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a saved ``summary()``: shards cut back to their recorded lengths, later ones deleted."""
        self.shards, self.documents = [dict(s) for s in state["shards"]], state["documents"]
        keep = {s["file"] for s in self.shards}
        for f in self.directory.glob(f"{self.split}_*.bin"):
            if f.name not in keep:
                f.unlink()
        for s in self.shards:
            path = self.directory / s["file"]
            if not path.is_file() or path.stat().st_size < s["tokens"] * DTYPE().itemsize:
                raise HavocError(f"{path}: shorter than {PROGRESS} records: cannot resume (delete "
                                 f"{self.directory} to start over)")
            os.truncate(path, s["tokens"] * DTYPE().itemsize)
        if self.shards:
            self._file = open(self.directory / self.shards[-1]["file"], "ab")

    def summary(self) -> dict[str, Any]:
        return {"documents": self.documents, "tokens": sum(s["tokens"] for s in self.shards),
                "shards": [dict(s) for s in self.shards]}


# ------------------------------------------------------------------ workers

_worker_tokenizer: HavocTokenizer | None = None


def _start_worker(tok: HavocTokenizer, parent: int) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle, once
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core each: the processes are the parallelism
    _worker_tokenizer = tok
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose main process ``parent`` was killed (``kill``, ``kill -9``) would wait forever
    on its queue: it exits as soon as it is re-parented (``parent`` is passed in, not read here:
    the main process may already be gone when a worker starts)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _encode(texts: list[str], tok: HavocTokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All ids of a batch in one uint32 array, and each document's length: cheap to send back."""
    ids = (tok or _worker_tokenizer).encode_batch(texts)  # type: ignore[union-attr]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=DTYPE, count=int(lengths.sum())), lengths


class _Done(Future):
    """A batch encoded in this process (``workers=1``), shaped like a pool's result."""

    def __init__(self, value: tuple[np.ndarray, np.ndarray]) -> None:
        super().__init__()
        self.set_result(value)


# ------------------------------------------------------------------ documents

def _documents(sources: Iterable[Any], skip_invalid: bool, skipped: list[str], text_key: str,
               bar: tqdm) -> Iterator[str]:
    """Texts as given, or, when the sources are paths, the documents in those files."""
    it = iter(sources)
    first = next(it, None)
    if first is None:
        return
    rest = itertools.chain([first], it)
    if isinstance(first, os.PathLike):
        yield from read_documents(rest, skip_invalid, text_key, skipped, progress=bar.update)
        return
    for i, text in enumerate(rest):
        if isinstance(text, str) and text.strip():
            yield text
            continue
        error = HavocError(f"document {i}: expected a non-empty string, found {repr(text)[:40]}")
        if not skip_invalid:
            raise error
        skipped.append(str(error))


def _batches(docs: Iterator[str], skip: int, seen: set[int] | None, counts: dict[str, int]) -> Iterator[Batch]:
    """Documents in batches, the first ``skip`` (already used by the run being resumed) read past;
    with ``seen``, a document whose ``dedup_key`` came before is dropped and counted."""
    texts: list[str] = []
    chars = 0
    for position, text in enumerate(docs, 1):
        if seen is not None:
            key = dedup_key(text)
            if key in seen:
                counts["deduplicated"] += 1
                continue
            seen.add(key)
        if position <= skip:
            continue
        texts.append(text)
        chars += len(text)
        if len(texts) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield texts, position
            texts, chars = [], 0
    if texts:
        yield texts, position


# ------------------------------------------------------------------ the run

def prepare_pretrain(sources: Iterable[str] | Iterable[os.PathLike], tokenizer: HavocTokenizer, out_dir: str | Path,
                     val_fraction: float = 0.02, *, seed: int = 0, shard_tokens: int = 1 << 27,
                     skip_invalid: bool = False, show_progress: bool = True, text_key: str = "text",
                     name: str = "", workers: int = 1, resume: bool = False, dedup: bool = False,
                     max_tokens: int | None = None) -> dict[str, Any]:
    """Tokenize documents (strings, or file paths: see ``sources.read_documents``) into uint32
    shards in ``out_dir`` with a whole-document train/val split; returns the manifest.

    ``workers`` processes tokenize (the output does not depend on how many); ``resume`` continues
    an interrupted run from its last filled shard; ``dedup`` drops exact duplicates (after case
    and whitespace normalisation); ``max_tokens`` stops after the document that reaches it.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise HavocError(f"val_fraction: expected a number in [0, 1), found {val_fraction}")
    if workers < 1:
        raise HavocError(f"workers: expected at least 1, found {workers}")
    if shard_tokens < 1:
        raise HavocError(f"shard_tokens: expected at least 1, found {shard_tokens}")
    if max_tokens is not None and max_tokens < 1:
        raise HavocError(f"max_tokens: expected at least 1, found {max_tokens}")
    if isinstance(sources, (set, frozenset)):
        sources = sorted(sources)
    out_dir = Path(out_dir)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    names = [str(s) for s in sources] if isinstance(sources, (list, tuple)) and sources and \
        all(isinstance(s, os.PathLike) for s in sources) else None
    options = {"sources": names, "name": name, "tokenizer_hash": tokenizer_hash(tokenizer),
               "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens, "text_key": text_key,
               "skip_invalid": skip_invalid, "dedup": dedup, "max_tokens": max_tokens}
    progress = _load_progress(partial, options) if resume else None
    if progress is None and partial.exists():
        if not resume and (partial / PROGRESS).is_file():
            raise HavocError(f"{out_dir}: an interrupted prepare is in {partial}: add --resume to continue it, "
                             "or delete that directory to start over")
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    run = _Run(partial, tokenizer, options, progress)
    skipped: list[str] = []
    total = _total_bytes(names)
    try:
        with tqdm(total=total, desc="tokenizing", unit="B" if total else " docs", unit_scale=bool(total),
                  disable=not show_progress, file=sys.stderr) as bar, _Workers(workers, tokenizer) as pool:
            docs = _documents(sources, skip_invalid, skipped, text_key, bar)
            run.tokenize(_batches(docs, run.consumed, set() if dedup else None, run.counts), pool, bar,
                         count_docs=total is None)
        manifest = run.finish(name, skipped)
    except HavocError:  # bad input: what was done is no base for a resume once the input is fixed
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish_dir(partial, out_dir)
    report_skipped(skipped, "inputs")
    if dedup:
        print(f"dropped {run.counts['deduplicated']:,} duplicate documents", file=sys.stderr)
    return manifest


class _Run:
    """The order-dependent state of one prepare: what ``progress.json`` saves and a resume restores."""

    def __init__(self, partial: Path, tokenizer: HavocTokenizer, options: dict[str, Any],
                 progress: dict[str, Any] | None) -> None:
        self.partial, self.tokenizer, self.options = partial, tokenizer, options
        self.rng = random.Random(options["seed"])
        self.writers = {split: _ShardWriter(partial, split, options["shard_tokens"]) for split in SPLITS}
        self.held: np.ndarray | None = None  # the latest document: the val split's fallback if it stays empty
        self.consumed = 0  # source documents used (duplicates included)
        self.counts = {"deduplicated": 0}
        if progress is not None:
            self.consumed, self.held = progress["consumed"], np.asarray(progress["held"], dtype=DTYPE)
            version, state, gauss = progress["rng"]
            self.rng.setstate((version, tuple(state), gauss))
            for split, w in self.writers.items():
                w.restore(progress["splits"][split])
            print(f"resuming {partial}: {self.consumed:,} documents already done", file=sys.stderr)
        self.tokens = sum(w.summary()["tokens"] for w in self.writers.values())

    def save_progress(self) -> None:
        for w in self.writers.values():
            w.flush()
            w.completed = 0
        state = {"options": self.options, "consumed": self.consumed, "rng": self.rng.getstate(),
                 "held": [] if self.held is None else self.held.tolist(),
                 "splits": {split: w.summary() for split, w in self.writers.items()}}
        write_atomic(self.partial / PROGRESS, json.dumps(state))

    def tokenize(self, batches: Iterator[Batch], pool: _Workers, bar: tqdm, count_docs: bool) -> None:
        bos, eos = np.asarray([self.tokenizer.bos_id], DTYPE), np.asarray([self.tokenizer.eos_id], DTYPE)
        max_tokens, val_fraction = self.options["max_tokens"], self.options["val_fraction"]
        pending: deque[tuple[Future, int]] = deque()
        started, stop = time.perf_counter(), False
        while not stop:
            for texts, position in itertools.islice(batches, 2 * pool.workers - len(pending)):
                pending.append((pool.submit(texts), position))
            if not pending:
                return
            future, position = pending.popleft()
            flat, lengths = future.result()
            for body in np.split(flat, np.cumsum(lengths)[:-1]):
                if self.held is not None:
                    self.writers["val" if self.rng.random() < val_fraction else "train"].add(self.held)
                self.held = np.concatenate([bos, body, eos])
                self.tokens += len(self.held)
                if max_tokens is not None and self.tokens >= max_tokens:
                    stop = True  # the rest is never used: nothing more to save for a resume
                    break
            self.consumed = position
            if not stop and any(w.completed for w in self.writers.values()):
                self.save_progress()
            if count_docs:
                bar.update(len(lengths))
            bar.set_postfix(docs=f"{position:,}", tokens=f"{self.tokens:,}",
                            tok_s=f"{self.tokens / max(time.perf_counter() - started, 1e-9):,.0f}")

    def finish(self, name: str, skipped: list[str]) -> dict[str, Any]:
        """Place the last document, write tokenizer and manifest; the manifest."""
        writers, held, val_fraction = self.writers, self.held, self.options["val_fraction"]
        if held is None:
            why = f" ({len(skipped)} skipped as invalid, first: {skipped[0]})" if skipped else ""
            raise HavocError(f"{name or 'inputs'}: no documents to tokenize{why}")
        # the last document goes to val if the coin says so, or if val would otherwise be empty
        val_empty, train_empty = writers["val"].documents == 0, writers["train"].documents == 0
        to_val = val_fraction > 0 and (val_empty or (self.rng.random() < val_fraction and not train_empty))
        if to_val and train_empty:
            raise HavocError(f"{name or 'inputs'}: only 1 document, so no validation split can be held out; "
                             "give more documents or val_fraction 0")
        writers["val" if to_val else "train"].add(held)
        for w in writers.values():
            w.close()
        tok = self.tokenizer
        manifest = {
            "format": FORMAT, "dtype": "uint32", "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "tokenizer_hash": tokenizer_hash(tok),
            "val_fraction": val_fraction, "seed": self.options["seed"], "skipped": len(skipped),
            "deduplicated": self.counts["deduplicated"], "max_tokens": self.options["max_tokens"],
            "splits": {split: w.summary() for split, w in writers.items()},
        }
        tok.save(self.partial)
        (self.partial / PROGRESS).unlink(missing_ok=True)
        write_atomic(self.partial / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return manifest


class _Workers:
    """The tokenizing processes (spawned: nothing of this process's threads is inherited), started
    only once a corpus proves big enough to pay for them: starting one imports the package and
    torch (~1-2 s), so the first ``IN_PROCESS_BATCHES`` batches, and everything with one worker,
    are encoded here by the tokenizer's own threads. Which process encodes a batch never changes
    the output."""

    IN_PROCESS_BATCHES = 8

    def __init__(self, workers: int, tokenizer: HavocTokenizer) -> None:
        self.workers, self.tokenizer = workers, tokenizer
        self.pool: ProcessPoolExecutor | None = None
        self.batches = 0

    def submit(self, texts: list[str]) -> Future:
        self.batches += 1
        if self.workers == 1 or self.batches <= self.IN_PROCESS_BATCHES:
            return _Done(_encode(texts, self.tokenizer))
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"), initializer=_start_worker,
                                            initargs=(self.tokenizer, os.getpid()))
        return self.pool.submit(_encode, texts)

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _total_bytes(paths: list[str] | None) -> int | None:
    """Bytes of the input files (the progress bar's total, for its ETA); None for other sources."""
    return sum(p.stat().st_size for p in expand_paths(paths)) if paths else None


def _load_progress(partial: Path, options: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state of an interrupted run with these options, or None when there is none."""
    path = partial / PROGRESS
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        saved = state["options"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise HavocError(f"{path}: unreadable ({e}): delete {partial} to start over") from None
    for key, value in options.items():
        if saved.get(key) != value:
            raise HavocError(f"{path}: {key}: the interrupted run used {saved.get(key)!r}, this one {value!r} "
                             f"(resume with the same inputs and options, or delete {partial})")
    return state
