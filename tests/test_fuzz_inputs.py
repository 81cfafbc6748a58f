"""Hostile inputs that are not checkpoints: data files given to `havoc prepare` (documents and
conversations), train config files, and command lines. Seeded (``HAVOC_FUZZ_SEED``), every case
bounded to 5 s; each must end with exit 0 or a one-line error (exit 2), never a traceback or a hang.

The command-line fuzz covers the commands that end by themselves on a tiny checkpoint; `train`,
`sft`, `demo` and `serve` run for as long as they are told when their flags are valid, so their
flags are fuzzed through ``TrainConfig`` (every train flag is one of its fields) and the HTTP fuzz.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzzing import CASE_SECONDS, MUTATIONS, SEED, bounded

from havoc_core.checkpoint import save_model
from havoc_core.cli import build_parser, main
from havoc_core.train_config import TrainConfig


def run_cli(argv: list[str], what: str, seconds: float = CASE_SECONDS) -> int:
    """``main(argv)`` bounded; argparse's own refusal (SystemExit 2) counts as an exit code."""

    def call() -> int:
        try:
            return main(argv)
        except SystemExit as e:
            return int(e.code or 0)

    return bounded(call, f"{what}: havoc {' '.join(argv)[:300]}", seconds)[1]


def check_exit(code: int, err: str, what: str) -> None:
    assert code in (0, 2), f"seed {SEED}: {what}: exit {code}"
    assert "Traceback" not in err, f"seed {SEED}: {what}: {err[-2000:]}"
    if code == 2:
        last = err.strip().splitlines()[-1]
        assert "error: " in last, f"seed {SEED}: {what}: no one-line error: {err[-500:]!r}"


# --------------------------------------------------------------------------- data files

BIG = "word " * 2_000_000  # tokenizing it alone takes seconds: its cases are bounded by that time
DEEP = "[" * 100_000 + "]" * 100_000
TEXT_PIECES = [b"The with statement wraps a block.\n", "accents \u00e9 \u4e2d\u6587 \U0001f600\n".encode(),
               b"\xff\xfe not utf-8\n", b"nul\x00byte\n", b"\r\n", b"\n\n", b"   \t\n", b"\xc3", b"\x00" * 40]
JSON_LINES = ['{"text": "a document"}', '{"text": 5}', '{"text": null}', '{"text": ""}', '{"txt": "x"}', "[1, 2]",
              '"just a string"', "1e999", "NaN", '{"text": "\\ud800"}', '{"text": ["a"]}', "{", DEEP,
              '{"text": "' + "\u4e2d\U0001f600" * 50 + '"}', '{"text": {"text": "x"}}']
ROLES = ["user", "assistant", "system", "robot", "", None, 5, "USER", "<|user|>"]
CONTENTS = ["hi", "", 5, None, ["x"], {"a": 1}, "\u4e2d\u6587 \U0001f600", "<|eos|>", "x" * 3000]


def random_conversation(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice(JSON_LINES)
    if kind == 1:
        return json.dumps({"messages": rng.choice([[], "hi", None, [1], [{}], {"role": "user"}])})
    messages = [{"role": rng.choice(ROLES), "content": rng.choice(CONTENTS)} for _ in range(rng.randrange(1, 5))]
    if kind < 5:  # plausible (valid for kind < 4): real roles, string contents, an assistant turn
        plausible = zip(["system", "user", "assistant"], ["Be brief.", "hi", "ok \U0001f600"], strict=True)
        messages = [{"role": r, "content": c} for r, c in plausible][rng.randrange(2):] + messages[:kind == 4]
        if kind < 4:
            return json.dumps({"messages": messages})
    for m in messages:
        if rng.random() < 0.1:
            del m[rng.choice(["role", "content"])]
        elif rng.random() < 0.1:
            m["extra"] = 1
    return json.dumps({"messages": messages})


def data_cases(rng: random.Random) -> Iterator[tuple[str, str, bytes]]:
    """(file name, description, bytes): text files and JSONL assembled from hostile pieces, 10 MB lines."""
    for i in range(40):
        pieces = [rng.choice(TEXT_PIECES) for _ in range(rng.randrange(1, 8))]
        yield f"doc{i}.txt", f"text file of {pieces!r}"[:200], b"".join(pieces)
    for i in range(40):
        lines = [rng.choice(JSON_LINES) for _ in range(rng.randrange(1, 6))]
        yield f"docs{i}.jsonl", f"jsonl of {[ln[:40] for ln in lines]}", "\n".join(lines).encode()
    yield "big.txt", "a 10 MB line of text", BIG.encode()
    yield "big.jsonl", "a 10 MB JSON line", json.dumps({"text": BIG}).encode()
    yield "empty.txt", "an empty file", b""


def sft_cases(rng: random.Random) -> Iterator[tuple[str, bytes]]:
    for _ in range(60):
        lines = [random_conversation(rng) for _ in range(rng.randrange(1, 5))]
        yield f"conversations {[ln[:60] for ln in lines]}", ("\n".join(lines) + "\n").encode()
    yield "invalid UTF-8 inside a conversation", b'{"messages": [{"role": "user", "content": "\xff"}]}\n'
    yield "a NUL byte", b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\x00"}]}'
    yield "a 10 MB conversation", json.dumps({"messages": [{"role": "user", "content": "hi " * 3_500_000},
                                                           {"role": "assistant", "content": "ok"}]}).encode()


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    tok.save(path)
    return path


def test_prepare_fuzz_documents(tmp_path, tok, tok_dir, capfd):
    rng = random.Random(SEED)
    counts: Counter = Counter()
    t0 = time.monotonic()
    tok.encode(BIG)
    big_seconds = CASE_SECONDS + 2 * (time.monotonic() - t0)  # prepare may take twice the bare tokenizer
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i}: the with statement"}) + "\n" for i in range(5)))
    for i, (name, what, data) in enumerate(data_cases(rng)):
        src = tmp_path / name
        src.write_bytes(data)
        for skip in ([], ["--skip-invalid"]):  # beside a valid file, so a valid case has documents to split
            out = tmp_path / f"out{i}{skip}"
            argv = ["prepare", str(src), str(good), "--tokenizer", str(tok_dir), "--out", str(out), *skip]
            code = run_cli(argv, what, big_seconds if name.startswith("big") else CASE_SECONDS)
            check_exit(code, capfd.readouterr().err, what)
            if code == 0:
                assert (out / "manifest.json").is_file(), f"seed {SEED}: {what}: no manifest"
            counts[(code, bool(skip))] += 1
        src.unlink()
    print(f"seed {SEED}: prepare (documents) exit codes (code, --skip-invalid): {dict(counts)}")
    assert counts[(2, False)] > 20 and counts[(0, True)] > counts[(0, False)] > 5  # the fuzz reached both outcomes


def test_prepare_fuzz_conversations(tmp_path, tok_dir, capfd):
    rng = random.Random(SEED)
    counts: Counter = Counter()
    for i, (what, data) in enumerate(sft_cases(rng)):
        src = tmp_path / f"c{i}.jsonl"
        src.write_bytes(data)
        for skip in ([], ["--skip-invalid"]):
            out = tmp_path / f"sft{i}{skip}.jsonl"
            code = run_cli(["prepare", "--sft", str(src), "--tokenizer", str(tok_dir), "--out", str(out), *skip], what)
            check_exit(code, capfd.readouterr().err, what)
            assert (code == 0) == out.is_file(), f"seed {SEED}: {what}: exit {code} but output file {out.is_file()}"
            counts[(code, bool(skip))] += 1
    print(f"seed {SEED}: prepare --sft exit codes (code, --skip-invalid): {dict(counts)}")
    assert counts[(2, False)] > 20 and counts[(0, False)] > 5


# --------------------------------------------------------------------------- train config files

def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return "null"  # TOML has no null: a parse error, as a user's `lr = null` is


def sane(cfg: TrainConfig) -> None:
    """A config that loads must be one a run can use: every number finite."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float):
            assert math.isfinite(value), f"{f.name} = {value} accepted"


def test_train_config_fuzz(tmp_path, capfd):
    rng = random.Random(SEED)
    base = {"phase": "pretrain", "max_steps": 10, "lr": 1e-3, "batch_size": 2}
    counts: Counter = Counter()
    cases = [(f"{f.name} {name}", {**base, f.name: value})
             for f in dataclasses.fields(TrainConfig) for name, value in MUTATIONS]
    cases += [("unknown key", {**base, "learning_rate": 1}), ("empty", {})]
    for i, (what, settings) in enumerate(cases):
        toml = tmp_path / f"c{i}.toml"
        toml.write_text("\n".join(f"{k} = {toml_value(v)}" for k, v in settings.items()) + "\n")
        for path in (toml, toml.with_suffix(".json")):
            if path.suffix == ".json":
                path.write_text(json.dumps(settings))  # JSON carries NaN/Infinity literals and null
            kind, value = bounded(lambda p=path: TrainConfig.load(p), f"{path.name} ({what})")
            if kind == "ok":
                sane(value)
            counts[kind] += 1
    raw_cases = [b"", b"\xff\xfe", b"\x00" * 10, b"lr = ", b"[lr]\nx = 1", b"lr = 1\nlr = 2", b"= 1", b"lr = 1e999"]
    raw_cases += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(40)]
    for i, raw in enumerate(raw_cases):
        path = tmp_path / f"raw{i}.toml"
        path.write_bytes(raw)
        kind, value = bounded(lambda p=path: TrainConfig.load(p), f"raw TOML {raw[:20]!r}")
        if kind == "ok":
            sane(value)
        counts[kind] += 1
    print(f"seed {SEED}: {sum(counts.values())} train config cases: {dict(counts)}")
    assert counts["refused"] > counts["ok"] > 50
    # and through the CLI: a refused file is one line and exit 2 before anything is built
    for path in sorted(tmp_path.glob("raw*.toml"))[:8]:
        if bounded(lambda p=path: TrainConfig.load(p), path.name)[0] == "refused":
            check_exit(run_cli(["pretrain", "--config", str(path)], path.name), capfd.readouterr().err, path.name)


# --------------------------------------------------------------------------- command lines

COMMANDS = ["inspect", "init", "generate", "smoke", "chat", "export", "plot", "import"]
VALUES = ["0", "-1", "1", "2", "1.5", "-0.5", "nan", "inf", "-inf", "1e309", "1e-300", "99999999999999999999", "",
          " ", "abc", "\u4e2d\u6587\U0001f600", "\udcff", "-", "--", "havoc-tiny", "havoc-9z", "gguf", "hf", "q8_0"]


def options(command: str) -> list[argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices[command]._actions if a.option_strings and a.dest != "help"]


def cli_cases(rng: random.Random, paths: list[str], fresh: Iterator[str]) -> Iterator[list[str]]:
    for _ in range(150):
        command = rng.choice(COMMANDS)
        argv = [command]
        if command in ("generate", "smoke", "chat", "inspect", "export", "plot", "import"):
            argv.append(paths[0] if rng.random() < 0.6 else rng.choice(paths))  # mostly the real checkpoint
        if command in ("export", "import"):
            argv.append(next(fresh))
        if command == "chat":
            argv += ["--prompt", rng.choice(VALUES)]  # never the interactive loop
        if command == "generate":
            argv += ["--prompt", rng.choice(VALUES)]
        if command == "init":
            argv += ["--out", next(fresh)]
        for action in rng.sample(options(command), min(3, len(options(command)))):
            flag = action.option_strings[-1]
            if flag in ("--out", "--compile"):  # --out is always a fresh path; compiling takes minutes
                continue
            argv += [flag] if action.nargs == 0 else [flag, value_for(action, rng, paths)]
        yield argv


def value_for(action: argparse.Action, rng: random.Random, paths: list[str]) -> str:
    """Mostly a value of the flag's own type (so some commands run), else anything."""
    if action.choices:
        pool = [str(c) for c in action.choices]
    elif action.type is int:
        pool = ["0", "1", "2", "8", "-1", "99999999999999999999"]
    elif action.type is float:
        pool = ["0", "0.5", "1", "1.5", "-1", "nan", "inf", "1e309"]
    else:
        pool = VALUES + paths
    return rng.choice(pool if rng.random() < 0.8 else VALUES + paths)


def test_cli_argument_fuzz(tmp_path, tok, tiny_model, capfd):
    rng = random.Random(SEED)
    ckpt = save_model(tmp_path / "ckpt", tiny_model(max_seq_len=64), tokenizer=tok)
    (tmp_path / "garbage").write_bytes(b"\xff\x00 not a checkpoint")
    (tmp_path / "dir").mkdir()
    # every path lies under tmp_path: a command told to write somewhere writes only there
    paths = [str(ckpt), str(ckpt.parent), str(tmp_path / "garbage"), str(tmp_path / "dir"), str(tmp_path / "nope")]
    fresh = (str(tmp_path / f"out{i}") for i in range(10**6))
    counts: Counter = Counter()
    for argv in cli_cases(rng, paths, fresh):
        what = "cli"
        code = run_cli(argv, what)
        check_exit(code, capfd.readouterr().err, f"havoc {' '.join(argv)}")
        counts[(argv[0], code)] += 1
    print(f"seed {SEED}: command-line cases (command, exit): {dict(sorted(counts.items()))}")
    assert sum(n for (_, code), n in counts.items() if code == 0) > 10
