"""`havoc prepare` throughput: tokens/s at 1, 2, ... N worker processes, and peak memory as the corpus grows.

A generated JSONL corpus (the built-in Python docs, each copy made distinct) of ``--megabytes`` MB
is prepared by the real CLI in a fresh process per run. "1 (1 thread)" is one process with the
tokenizer's own thread pool switched off: the single-core rate the goal is stated against (at
least 0.8 x N x it with N workers). Peak resident memory is the whole process tree's high-water
mark (``wait4``), for the corpus and for one 4x bigger; every run's output is checked
byte-identical to the first's.

    python bench/prepare.py [--megabytes 200] [--workers 1 2] [--growth 4]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from havoc_core.builtin_corpus import builtin_documents
from havoc_core.prepare import default_workers
from havoc_core.tokenizer import HavocTokenizer

HAVOC = [sys.executable, "-m", "havoc_core.cli"]


def write_corpus(path: Path, megabytes: float) -> int:
    """Distinct documents (a copy number in front of each built-in one) up to ``megabytes``; bytes written."""
    docs = builtin_documents()
    size, copy = 0, 0
    with open(path, "w") as f:
        while size < megabytes * 1e6:
            for t in docs:
                line = json.dumps({"text": f"copy {copy}: {t}"}) + "\n"
                f.write(line)
                size += len(line)
            copy += 1
    return size


def run_prepare(corpus: Path, tok_dir: Path, out: Path, workers: int, one_thread: bool) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes, whole process tree) of one `havoc prepare`."""
    env = dict(os.environ)
    if one_thread:
        env["TOKENIZERS_PARALLELISM"] = "false"
        env["RAYON_NUM_THREADS"] = "1"
    log = out.parent / f"{out.name}.log"  # a file, not a pipe: the progress bar must never block on a full pipe
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen([*HAVOC, "prepare", str(corpus), "--tokenizer", str(tok_dir), "--out", str(out),
                                 "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"havoc prepare failed:\n{log.read_text()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megabytes", type=float, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=sorted({1, 2, default_workers()}))
    ap.add_argument("--growth", type=int, default=4, help="the memory check's bigger corpus, as a multiple")
    ap.add_argument("--vocab-size", type=int, default=32768)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        tok = HavocTokenizer.train(builtin_documents(), vocab_size=args.vocab_size, show_progress=False)
        tok.save(root / "tok")
        size = write_corpus(root / "corpus.jsonl", args.megabytes)
        runs = [(1, True)] + [(w, False) for w in args.workers]
        results, digests = [], set()
        for workers, one_thread in runs:
            out = root / f"out_{workers}_{int(one_thread)}"
            seconds, rss = run_prepare(root / "corpus.jsonl", root / "tok", out, workers, one_thread)
            manifest = json.loads((out / "manifest.json").read_text())
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            digests.add(digest(out))
            results.append({"workers": f"{workers}{' (1 thread)' if one_thread else ''}", "seconds": round(seconds, 1),
                            "tokens_per_s": round(tokens / seconds), "peak_rss_mb": round(rss / 2**20)})
            subprocess.run(["rm", "-rf", str(out)], check=True)
        base = results[0]["tokens_per_s"]
        for r, (workers, one_thread) in zip(results, runs, strict=True):
            r["vs_one_core"] = round(r["tokens_per_s"] / base, 2)
            r["scaling_efficiency"] = round(r["tokens_per_s"] / (base * workers), 2) if not one_thread else 1.0
        big = root / "big.jsonl"
        with open(big, "wb") as f:
            for _ in range(args.growth):
                f.write((root / "corpus.jsonl").read_bytes())
        (root / "corpus.jsonl").unlink()
        top = max(args.workers)
        seconds, rss = run_prepare(big, root / "tok", root / "out_big", top, False)
        growth = {"megabytes": round(size * args.growth / 1e6), "workers": top, "seconds": round(seconds, 1),
                  "peak_rss_mb": round(rss / 2**20),
                  "rss_vs_small": round(rss / 2**20 / next(r["peak_rss_mb"] for r in results
                                                            if r["workers"] == str(top)), 2)}
        print(json.dumps({"cores": default_workers(), "corpus_mb": round(size / 1e6), "tokens": tokens,
                          "vocab_size": args.vocab_size, "identical_output": len(digests) == 1,
                          "runs": results, "corpus_x_growth": growth}, indent=2))


if __name__ == "__main__":
    main()
