"""Tokenizer encode throughput: HAVOC vs transformers' fast tokenizer vs tiktoken, same vocab.

All three encode the built-in corpus (Python's own documentation) with the same BPE: HAVOC's
``HavocTokenizer``, ``transformers.AutoTokenizer`` loading the same ``tokenizer.json``, and a
``tiktoken.Encoding`` built from the same merges (ranks = ids, GPT-2 split pattern). Per-document
calls on one thread, and each library's batch call; best of ``--repeat`` runs, in one process.

    python bench/tokenizer.py [--vocab-size 8192 70000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable

from havoc_core.builtin_corpus import builtin_documents
from havoc_core.tokenizer import HavocTokenizer

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def tiktoken_encoding(tok_json: str):
    """A ``tiktoken.Encoding`` with HAVOC's merges: byte-level symbols mapped back to raw bytes."""
    import tiktoken
    from tokenizers.pre_tokenizers import ByteLevel

    # GPT-2's byte <-> printable-unicode table, as ByteLevel uses it
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = [b for b in range(256) if b not in printable]
    char_to_byte = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(extra)}
    assert set(char_to_byte) == set(ByteLevel.alphabet())
    vocab = json.loads(tok_json)["model"]["vocab"]
    ranks = {bytes(char_to_byte[c] for c in token): rank for token, rank in vocab.items()}
    return tiktoken.Encoding("havoc", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={})


def best_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(docs: list[str], vocab_size: int, repeat: int) -> dict:
    from transformers import AutoTokenizer

    tok = HavocTokenizer.train(docs, vocab_size=vocab_size, show_progress=False)
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        hf = AutoTokenizer.from_pretrained(d)
    tk = tiktoken_encoding(tok.to_json())
    ours = [tok.encode(d) for d in docs]
    n_tokens = sum(map(len, ours))
    agree = {
        "hf": sum(hf.encode(d, add_special_tokens=False) == ids for d, ids in zip(docs, ours, strict=True)),
        "tiktoken": sum(tk.encode_ordinary(d) == ids for d, ids in zip(docs, ours, strict=True)),
    }
    threads = os.cpu_count() or 1
    cases = {
        "havoc encode (per doc)": lambda: [tok.encode(d) for d in docs],
        "hf fast (per doc)": lambda: [hf.encode(d, add_special_tokens=False) for d in docs],
        "tiktoken (per doc)": lambda: [tk.encode_ordinary(d) for d in docs],
        "havoc encode_batch": lambda: tok.encode_batch(docs),
        "hf fast batch": lambda: hf(docs, add_special_tokens=False)["input_ids"],
        f"tiktoken batch ({threads} threads)": lambda: tk.encode_ordinary_batch(docs, num_threads=threads),
    }
    rates = {name: n_tokens / best_time(fn, repeat) for name, fn in cases.items()}
    return {"vocab_size": vocab_size, "learned_tokens": vocab_size - tok.num_reserved, "documents": len(docs),
            "megabytes": round(sum(len(d.encode()) for d in docs) / 1e6, 2), "tokens": n_tokens,
            "identical_docs": {k: f"{v}/{len(docs)}" for k, v in agree.items()},
            "tokens_per_s": {k: round(v) for k, v in rates.items()},
            "havoc_vs_hf": round(rates["havoc encode (per doc)"] / rates["hf fast (per doc)"], 2),
            "havoc_vs_tiktoken": round(rates["havoc encode (per doc)"] / rates["tiktoken (per doc)"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, nargs="+", default=[8192, 70000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    docs = builtin_documents()
    for v in args.vocab_size:
        r = bench(docs, v, args.repeat)
        print(f"\nvocab {v:,} ({r['learned_tokens']:,} learned), {r['documents']} docs, {r['megabytes']} MB, "
              f"{r['tokens']:,} tokens; identical ids per doc: {r['identical_docs']}")
        for name, rate in r["tokens_per_s"].items():
            print(f"  {name:32s} {rate / 1e6:6.2f} M tokens/s")
        print(f"  HAVOC / HF fast = {r['havoc_vs_hf']}x, HAVOC / tiktoken = {r['havoc_vs_tiktoken']}x (per doc)")
        print(json.dumps(r))


if __name__ == "__main__":
    main()
