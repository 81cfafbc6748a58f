"""Hostile checkpoints: seeded corruptions of a real saved checkpoint (config.json leaves, the weights
file's header, length and body, wrong dtypes, tokenizer files), each loaded the way `havoc chat`
loads it. Every case must end within 5 s in one of two ways: refused with a ``HavocError``, or
loaded with the saved model's logits (and tokens) bit for bit. A traceback, a hang or a silent
mis-load fails the test, which prints the seed and the case so it can be replayed.

Without checksums.json a checkpoint cannot be told apart from a deliberately edited one, so there
the config fields in ``FUNCTION_FIELDS`` may load with other logits (docs/RELIABILITY.md says why);
with it, nothing but the saved bytes loads.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzzing import MUTATIONS, SEED, bounded

from havoc_core.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_model
from havoc_core.inference import load_for_inference
from havoc_core.integrity import MANIFEST_FILE
from havoc_core.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

TEXT = "The with statement is used to wrap the execution of a block"
# change the function without touching a shape; only loadable (with other logits) without checksums.json
FUNCTION_FIELDS = {"attention.rope_theta", "attention.rotary_dim", "layer_norm_eps", "mlp.activation"}
# read by training or generation only: any valid value loads the same logits
INERT_FIELDS = {"dropout", "attention.dropout", "mlp.dropout", "initializer_range", "max_seq_len"}


@pytest.fixture(scope="module")
def saved(tok, tiny_config, tmp_path_factory) -> tuple[Path, torch.Tensor, list[int]]:
    """A real checkpoint (tiny model + the pydoc tokenizer), its logits on TEXT and TEXT's ids."""
    from havoc_core import HavocModel

    torch.manual_seed(0)
    ckpt = save_model(tmp_path_factory.mktemp("fuzz") / "ckpt", HavocModel(tiny_config()), tokenizer=tok)
    return ckpt, *load(ckpt)


def load(ckpt: Path) -> tuple[torch.Tensor, list[int]]:
    """Load as `havoc chat` does (tokenizer, then model), in fp32; logits and ids of TEXT."""
    model, tokenizer = load_for_inference(ckpt, dtype=torch.float32)
    ids = [tokenizer.bos_id, *tokenizer.encode(TEXT)]
    with torch.no_grad():
        return model(torch.tensor([ids])), ids


def leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def set_leaf(tree: dict[str, Any], path: str, value: Any, delete: bool = False) -> None:
    *parents, last = path.split(".")
    for p in parents:
        tree = tree[p]
    if delete:
        del tree[last]
    else:
        tree[last] = value


def config_cases(config: dict[str, Any]) -> Iterator[tuple[str, str, bytes]]:
    """(field, description, new config.json bytes): every leaf deleted and set to every MUTATION,
    extra keys, and bytes that are not JSON at all."""
    for path in leaves(config):
        variants = [("deleted", None, True)] + [(name, v, False) for name, v in MUTATIONS]
        for name, value, delete in variants:
            tree = json.loads(json.dumps(config))
            set_leaf(tree, path, value, delete)
            yield path, f"config.json {path} {name}", json.dumps(tree).encode()
    for where in ("", "attention.", "mlp."):
        tree = json.loads(json.dumps(config))
        set_leaf(tree, f"{where}surprise", 1)
        yield "extra", f"config.json extra key {where}surprise", json.dumps(tree).encode()
    text = json.dumps(config).encode()
    for raw in (b"", b"{", b"[]", b"null", b"\xff\xfe", b"\x00" * 64, text[: len(text) // 2], text + b"}",
                b"{\"format_version\": 99}", text.replace(b"{", b"[", 1)):
        yield "bytes", f"config.json raw {raw[:20]!r}", raw


def weight_cases(blob: bytes, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """(description, new model.safetensors bytes): truncations, a corrupted length prefix, changed
    header bytes, flipped bits in the tensor data, dtypes changed in the header, a dropped tensor."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    for cut in sorted(rng.sample(range(len(blob)), 40)) + [0, 7, 8, 8 + n - 1, 8 + n, len(blob) - 1]:
        yield f"truncated to {cut} bytes", blob[:cut]
    for value in (0, 1, n - 1, n + 1, n + 8, len(blob), 2**40, 2**64 - 1):
        yield f"header length {value}", struct.pack("<Q", value) + blob[8:]
    for _ in range(100):
        i = rng.randrange(8, 8 + n)
        b = bytearray(blob)
        b[i] = rng.choice([ord(c) for c in '{}[]",:0123456789 ax\x00'] + [0xFF])
        yield f"header byte {i} -> {b[i]:#x}", bytes(b)
    for _ in range(150):
        i, bit = rng.randrange(8 + n, len(blob)), rng.randrange(8)
        b = bytearray(blob)
        b[i] ^= 1 << bit
        yield f"body byte {i} bit {bit} flipped", bytes(b)
    names = [k for k in header if k != "__metadata__"]
    for dtype in ("F16", "BF16", "I32", "U8", "F64", "BOOL", "F8_E4M3", "XX"):
        for name in rng.sample(names, 2):
            h = json.loads(json.dumps(header))
            h[name]["dtype"] = dtype
            text = json.dumps(h).encode()
            text += b" " * (-len(text) % 8)
            yield f"{name} dtype {dtype}", struct.pack("<Q", len(text)) + text + blob[8 + n :]
    for name in rng.sample(names, 4):
        h = json.loads(json.dumps(header))
        del h[name]
        text = json.dumps(h).encode()
        yield f"tensor {name} dropped", struct.pack("<Q", len(text)) + text + blob[8 + n :]


def text_cases(name: str, blob: bytes, rng: random.Random, n: int) -> Iterator[tuple[str, bytes]]:
    """Truncations, changed bytes, invalid UTF-8, NUL bytes and other JSON for a JSON file."""
    for _ in range(n):
        b = bytearray(blob)
        kind = rng.randrange(4)
        if kind == 0:
            cut = rng.randrange(len(b))
            yield f"{name} truncated to {cut}", bytes(b[:cut])
            continue
        i = rng.randrange(len(b))
        b[i] = [rng.randrange(256), 0xFF, 0x00, ord(rng.choice('{}[]",:0a'))][kind]
        yield f"{name} byte {i} -> {b[i]:#x}", bytes(b)
    for raw in (b"", b"{}", b"[]", b"null", b"\xff", b"\x00\x00", b'{"model": 1}', b"1e999", b"[" * 10000):
        yield f"{name} raw {raw[:12]!r}", raw


def run_cases(saved, tmp_path: Path, cases: Iterator[tuple[str, str, str, bytes]], *, keep_manifest: bool,
              may_differ: Callable[[str, str], bool]) -> Counter:
    """Write each (file, field, description, bytes) into a fresh copy of the checkpoint, load it,
    and check the outcome; counts of outcomes by kind."""
    ckpt, ref_logits, ref_ids = saved
    counts: Counter = Counter()
    for i, (file, field, what, data) in enumerate(cases):
        case = tmp_path / f"case{i}"
        shutil.copytree(ckpt, case)
        (case / file).write_bytes(data)
        if not keep_manifest:
            (case / MANIFEST_FILE).unlink()
        try:
            kind, value = bounded(lambda c=case: load(c), what)
            if kind == "ok":
                logits, ids = value
                same = ids == ref_ids and logits.shape == ref_logits.shape and torch.equal(logits, ref_logits)
                assert same or may_differ(field, what), f"seed {SEED}: {what}: loaded with other logits"
                kind = "identical" if same else "differs (allowed)"
            counts[kind] += 1
        finally:
            shutil.rmtree(case)
    return counts


def all_cases(saved) -> Iterator[tuple[str, str, str, bytes]]:
    ckpt = saved[0]
    rng = random.Random(SEED)
    config = json.loads((ckpt / CONFIG_FILE).read_text())
    for field, what, data in config_cases(config):
        yield CONFIG_FILE, field, what, data
    for what, data in weight_cases((ckpt / WEIGHTS_FILE).read_bytes(), rng):
        yield WEIGHTS_FILE, "weights", what, data
    for name, n in ((TOKENIZER_FILE, 60), (TOKENIZER_CONFIG_FILE, 20)):
        for what, data in text_cases(name, (ckpt / name).read_bytes(), rng, n):
            yield name, "tokenizer", what, data


def test_with_checksums_nothing_but_the_saved_bytes_loads(saved, tmp_path, capsys):
    cases = list(all_cases(saved))
    assert len(cases) >= 1000
    counts = run_cases(saved, tmp_path, iter(cases), keep_manifest=True, may_differ=lambda f, w: False)
    print(f"seed {SEED}: {len(cases)} checkpoint cases with checksums.json: {dict(counts)}")
    assert counts["refused"] > 0.9 * len(cases) and sum(counts.values()) == len(cases)


def test_without_checksums_only_function_fields_change_logits(saved, tmp_path):
    """The older checkpoints' path: structure checks alone. Config and header cases only: a flipped
    bit in the tensor data cannot be seen without a hash (the note on loading says so)."""
    cases = [c for c in all_cases(saved) if "body byte" not in c[2] and c[0] != TOKENIZER_CONFIG_FILE]

    def may_differ(field: str, what: str) -> bool:
        return field in FUNCTION_FIELDS or field == "tokenizer"  # a tokenizer edited by hand is a tokenizer

    counts = run_cases(saved, tmp_path, iter(cases), keep_manifest=False, may_differ=may_differ)
    print(f"seed {SEED}: {len(cases)} checkpoint cases without checksums.json: {dict(counts)}")
    assert counts["refused"] > 0.8 * len(cases)


def test_the_fuzz_harness_sees_a_silent_misload(saved, tmp_path):
    """The harness can fail: a flipped weight bit with no checksums.json loads with other logits."""
    ckpt = saved[0]
    blob = bytearray((ckpt / WEIGHTS_FILE).read_bytes())
    blob[-3] ^= 0x40
    case = [(WEIGHTS_FILE, "weights", "flip without checksums", bytes(blob))]
    with pytest.raises(AssertionError, match="loaded with other logits"):
        run_cases(saved, tmp_path, iter(case), keep_manifest=False, may_differ=lambda f, w: False)
    counts = run_cases(saved, tmp_path, iter(case), keep_manifest=True, may_differ=lambda f, w: False)
    assert counts == {"refused": 1}


def test_inert_fields_are_really_inert(saved, tmp_path):
    """Fields the docs call inert for loading load with identical logits when changed validly."""
    ckpt = saved[0]
    config = json.loads((ckpt / CONFIG_FILE).read_text())
    cases = []
    for path, value in [("dropout", 0.5), ("attention.dropout", 0.1), ("mlp.dropout", 0.2),
                        ("initializer_range", 1.0), ("max_seq_len", 4096)]:
        assert path in INERT_FIELDS
        tree = json.loads(json.dumps(config))
        set_leaf(tree, path, value)
        cases.append((CONFIG_FILE, path, f"{path}={value}", json.dumps(tree).encode()))
    counts = run_cases(saved, tmp_path, iter(cases), keep_manifest=False, may_differ=lambda f, w: False)
    assert counts == {"identical": len(cases)}


def test_inspect_verify_names_the_corrupt_file_and_tensor(saved, tmp_path):
    """`havoc inspect --verify`: intact passes; one flipped bit inside a tensor is exit 2 with one line
    naming the file and that tensor; without checksums.json, loading notes it once and verify refuses."""
    import subprocess
    import sys

    ckpt = shutil.copytree(saved[0], tmp_path / "ckpt")
    havoc = [sys.executable, "-m", "havoc_core.cli", "inspect", str(ckpt), "--verify"]
    ok = subprocess.run(havoc, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "verified: every file listed" in ok.stdout, ok.stderr
    blob = bytearray((ckpt / WEIGHTS_FILE).read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    name = sorted(k for k in header if k != "__metadata__")[len(header) // 2]
    lo, hi = header[name]["data_offsets"]
    blob[8 + n + (lo + hi) // 2] ^= 0x01
    (ckpt / WEIGHTS_FILE).write_bytes(bytes(blob))
    bad = subprocess.run(havoc, capture_output=True, text=True, timeout=60)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert f"{ckpt / WEIGHTS_FILE}: content hash differs" in lines[0] and lines[0].endswith(f"tensor {name}")
    (ckpt / MANIFEST_FILE).unlink()
    loaded = subprocess.run([sys.executable, "-c", "import sys; from havoc_core.inference import load_for_inference;"
                             "[load_for_inference(sys.argv[1]) for _ in range(2)]", str(ckpt)],
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stderr.count(f"no {MANIFEST_FILE}") == 1 and "loaded unverified" in loaded.stderr
    unverifiable = subprocess.run(havoc, capture_output=True, text=True, timeout=60)
    assert unverifiable.returncode == 2 and "nothing to verify against" in unverifiable.stderr
