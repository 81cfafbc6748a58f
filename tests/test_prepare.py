"""Corpus-scale prepare: byte-identical output for any worker count, every source format, resume
after a real Ctrl-C and a real kill -9, dedup, --max-tokens, a streamed Hugging Face dataset."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from havoc_core import HavocError, prepare
from havoc_core.builtin_corpus import builtin_documents
from havoc_core.data import MANIFEST, open_split
from havoc_core.prepare import prepare_pretrain
from havoc_core.sources import read_documents
from havoc_core.tokenizer import HavocTokenizer

zstandard = pytest.importorskip("zstandard", reason="the `data` extra (zstandard) is not installed")
pq = pytest.importorskip("pyarrow.parquet", reason="the `data` extra (pyarrow) is not installed")
import pyarrow  # noqa: E402

HAVOC = [sys.executable, "-m", "havoc_core.cli"]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return builtin_documents()[:240]


@pytest.fixture(scope="module")
def tok(docs, tmp_path_factory) -> HavocTokenizer:
    tok = HavocTokenizer.train(docs, vocab_size=1024, show_progress=False)
    tok.save(tmp_path_factory.mktemp("tok"))
    return tok


def write_corpus(root: Path, docs: list[str]) -> list[str]:
    """The documents spread over every format a directory may hold; returns them in reading order
    (files sorted by name, rows in order)."""
    root.mkdir(parents=True, exist_ok=True)
    parts = [docs[i::5] for i in range(5)]
    (root / "a_plain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in parts[0]))
    with gzip.open(root / "b_gz.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(parts[1]))
    lines = "".join(json.dumps({"text": t}) + "\n" for t in parts[2]).encode()
    (root / "c_zst.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pyarrow.table({"text": parts[3], "n": list(range(len(parts[3])))}), root / "d.parquet",
                   row_group_size=7)
    (root / "e_texts").mkdir()
    for i, t in enumerate(parts[4]):
        (root / "e_texts" / f"{i:04d}.txt").write_text(t, encoding="utf-8")
    return [*parts[0], *parts[1], *parts[2], *parts[3], *parts[4]]


def digest(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


def test_every_format_reads_back_in_order(tmp_path, docs):
    expected = write_corpus(tmp_path / "c", docs)
    assert list(read_documents([tmp_path / "c"])) == expected


def test_workers_1_2_3_write_the_same_bytes_and_dedup_counts(tmp_path, docs, tok, monkeypatch):
    # batches of 16 documents, the pool started after the first: ~17 batches, most through the processes
    monkeypatch.setattr(prepare, "BATCH_DOCS", 16)
    monkeypatch.setattr(prepare._Workers, "IN_PROCESS_BATCHES", 1)
    corpus = write_corpus(tmp_path / "c", docs + docs[:30])  # 30 exact duplicates ...
    variant = "  " + docs[0].upper() + " \n"  # ... and one that differs only in case and whitespace
    (tmp_path / "c" / "f_case.jsonl").write_text(json.dumps({"text": variant}) + "\n")
    corpus.append(variant)
    first: dict[str, str] = {}  # normalised text -> its first document, in reading order
    for text in corpus:
        first.setdefault(" ".join(text.lower().split()), text)
    results = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        manifest = prepare_pretrain([tmp_path / "c"], tok, out, val_fraction=0.1, shard_tokens=3000,
                                    workers=workers, dedup=True, show_progress=False)
        results[workers] = digest(out)
    assert results[1] == results[2] == results[3]
    assert manifest["deduplicated"] == len(corpus) - len(first) >= 31
    assert len(manifest["splits"]["train"]["shards"]) > 5
    kept = manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"]
    assert kept == len(first) and not list(tmp_path.glob(".*partial"))
    # the shards hold exactly what a direct encode of the kept documents gives
    tokens = sum(len(s) for split in ("train", "val") for s in open_split(tmp_path / "w2", split))
    assert tokens == sum(len(tok.encode(t)) + 2 for t in first.values())


def test_max_tokens_stops_at_the_document_that_reaches_it(tmp_path, docs, tok):
    manifest = prepare_pretrain(docs, tok, tmp_path / "o", max_tokens=5000, workers=2, show_progress=False)
    total = sum(s["tokens"] for s in manifest["splits"].values())
    lengths = [len(tok.encode(t)) + 2 for t in docs]
    reached = next(i for i in range(len(lengths)) if sum(lengths[: i + 1]) >= 5000)
    assert total == sum(lengths[: reached + 1])


def test_bad_records_are_named_or_skipped_and_counted(tmp_path, tok):
    c = tmp_path / "c"
    c.mkdir()
    (c / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "fine"}\n{"text": 3}\n')[:-8] + b"garbage!")
    pq.write_table(pyarrow.table({"body": ["x"]}), c / "b.parquet")
    (c / "c.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(HavocError, match=r"a.jsonl.gz:2: expected an object with a non-empty string 'text'"):
        prepare_pretrain([c], tok, tmp_path / "o", show_progress=False)
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()
    skipped: list[str] = []
    assert list(read_documents([c], skip_invalid=True, skipped=skipped)) == ["fine"]
    assert "a.jsonl.gz:2" in skipped[0] and "corrupt compressed data" in skipped[1]
    assert "b.parquet: no column 'text' (found ['body']" in skipped[2]
    assert "c.parquet: not a valid Parquet file" in skipped[3]


def test_hf_dataset_is_streamed_and_stopped_by_max_tokens(tmp_path, docs, tok):
    """A local parquet dataset through `datasets` streaming, offline: the same path as a hub name."""
    pytest.importorskip("datasets")
    (tmp_path / "ds" / "data").mkdir(parents=True)
    pq.write_table(pyarrow.table({"content": docs}), tmp_path / "ds" / "data" / "train-00000.parquet")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([*HAVOC, "prepare", "--hf-dataset", str(tmp_path / "ds"), "--text-key", "content",
                          "--tokenizer", str(tok_dir(tmp_path, tok)), "--out", str(tmp_path / "o"),
                          "--max-tokens", "4000", "--workers", "2"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "o" / MANIFEST).read_text())
    total = sum(s["tokens"] for s in manifest["splits"].values())
    assert 4000 <= total < 4000 + max(len(tok.encode(t)) + 2 for t in docs)


def tok_dir(tmp_path: Path, tok: HavocTokenizer) -> Path:
    tok.save(tmp_path / "tok")
    return tmp_path / "tok"


def big_corpus(root: Path, docs: list[str], copies: int) -> None:
    """Enough text that tokenizing it takes seconds: every document many times, each copy distinct."""
    root.mkdir()
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(copies):
            f.writelines(json.dumps({"text": f"copy {i}: {t}"}) + "\n" for t in docs)


@pytest.mark.parametrize("how", ["ctrl-c", "kill-9"])
def test_an_interrupted_prepare_resumes_byte_identical(tmp_path, docs, tok, how):
    big_corpus(tmp_path / "c", docs, copies=40)
    args = [str(tmp_path / "c"), "--tokenizer", str(tok_dir(tmp_path, tok)), "--shard-tokens", "20000"]
    reference = subprocess.run([*HAVOC, "prepare", *args, "--out", str(tmp_path / "ref"), "--workers", "1"],
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    out, partial = tmp_path / "o", tmp_path / ".o.partial"
    proc = subprocess.Popen([*HAVOC, "prepare", *args, "--out", str(out), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (partial / "progress.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "finished before it could be interrupted: make the corpus bigger"
    os.killpg(proc.pid, signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)  # Ctrl-C reaches the whole group
    _, err = proc.communicate(timeout=60)
    if how == "ctrl-c":
        assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err[-2000:]
        assert "Traceback" not in err
    assert not out.exists() and (partial / "progress.json").is_file()

    again = subprocess.run([*HAVOC, "prepare", *args, "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "add --resume to continue it" in again.stderr
    changed = subprocess.run([*HAVOC, "prepare", *args, "--out", str(out), "--resume", "--seed", "1"],
                             capture_output=True, text=True, timeout=60)
    assert changed.returncode == 2 and "seed: the interrupted run used 0, this one 1" in changed.stderr
    resumed = subprocess.run([*HAVOC, "prepare", *args, "--out", str(out), "--resume", "--workers", "3"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "0 documents already done" not in resumed.stderr
    assert digest(out) == digest(tmp_path / "ref") and not partial.exists()


def children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids |= {int(k) for k in (task / "children").read_text().split()}
    return kids


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_workers_exit_when_the_main_process_is_killed(tmp_path, docs, tok):
    """`kill` of the main process alone (not its group): its tokenizing workers must not linger."""
    big_corpus(tmp_path / "c", docs, copies=40)
    proc = subprocess.Popen([*HAVOC, "prepare", str(tmp_path / "c"), "--tokenizer", str(tok_dir(tmp_path, tok)),
                             "--out", str(tmp_path / "o"), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(workers := children(proc.pid)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # two workers and multiprocessing's resource tracker
        assert proc.poll() is None and len(workers) >= 3, "finished before it could be killed"
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60  # a worker may still be importing torch on a slow machine
        while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [w for w in workers if Path(f"/proc/{w}/status").exists()
                 and "zombie" not in Path(f"/proc/{w}/status").read_text()]
        assert not alive, f"workers still running 60 s after their main process was killed: {alive}"
    finally:
        for w in children(proc.pid) if proc.poll() is None else ():
            os.kill(w, signal.SIGKILL)
        proc.kill()
