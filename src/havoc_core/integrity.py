"""Content hashes of a checkpoint's files (``checksums.json``): written at save, verified at load.

safetensors carries no checksum, so one flipped bit in a weight would load silently with other
logits; a hash is the only way to tell. ``checksums.json`` holds the xxh3-128 of every file the
checkpoint was saved with and, for the weights, of every tensor's bytes and of the header, so a
mismatch names the file and the tensor. xxh3 is among the fastest non-cryptographic hashes: 0.3 s
for havoc-2b's 4 GB, hidden behind preparing the model by ``inference.load_for_inference``, which
verifies in a thread (docs/RELIABILITY.md). A checkpoint without the file (older, imported by
hand) loads with a one-line note; ``optimizer.pt`` is only checked by ``havoc inspect --verify`` and on resume.
"""

from __future__ import annotations

import json
import mmap
import struct
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import xxhash

from havoc_core.atomic import write_atomic
from havoc_core.errors import CheckpointError

MANIFEST_FILE = "checksums.json"
ALGORITHM = "xxh3_128"
HEADER = "<header>"  # the key of the safetensors header's own hash in the tensors table
_noted: set[str] = set()


def _digest(data: Any) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def hash_file(path: Path) -> str:
    """xxh3-128 of a file's bytes, read through mmap (no copy; an empty file hashes b"")."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return _digest(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _digest(m)


def tensor_hashes(path: Path) -> dict[str, str]:
    """The hash of the safetensors header (under ``HEADER``) and of each tensor's raw bytes, found
    from the header's offsets; a header that cannot be parsed is one entry: its hash of nothing."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 8:
            return {HEADER: ""}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            (n,) = struct.unpack("<Q", m[:8])
            if n > size - 8:
                return {HEADER: ""}
            out = {HEADER: _digest(m[: 8 + n])}
            try:
                header = json.loads(bytes(m[8 : 8 + n]))
                spans = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
                for name, (lo, hi) in spans.items():
                    out[name] = _digest(memoryview(m)[8 + n + int(lo) : 8 + n + int(hi)])
            except (ValueError, TypeError, KeyError, AttributeError):
                pass  # the header hash already differs; nothing more can be named
            return out


def write_manifest(directory: Path, weights_file: str) -> Path:
    """Hash every file now in ``directory`` (the checkpoint being written) into checksums.json."""
    files = {p.name: hash_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    tensors = tensor_hashes(directory / weights_file) if (directory / weights_file).is_file() else {}
    manifest = {"algorithm": ALGORITHM, "files": files, "tensors": {weights_file: tensors}}
    return write_atomic(directory / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    """checksums.json of ``ckpt``, or None when it has none; a malformed one is a CheckpointError."""
    path = ckpt / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checksums ({e.__class__.__name__}); the checkpoint cannot "
                              "be verified (delete the file to load it unverified)") from None
    ok = (isinstance(data, dict) and data.get("algorithm") == ALGORITHM and isinstance(data.get("files"), dict)
          and all(isinstance(v, str) for v in data["files"].values()) and isinstance(data.get("tensors", {}), dict))
    if not ok:
        raise CheckpointError(f"{path}: expected {{\"algorithm\": \"{ALGORITHM}\", \"files\": {{name: hex}}}}; "
                              "the checkpoint cannot be verified (delete the file to load it unverified)")
    return data


def _mismatch(ckpt: Path, manifest: dict[str, Any], name: str) -> str:
    """One line naming what differs in file ``name``: for a weights file, the first changed tensor."""
    where = f"{ckpt / name}: content hash differs from {MANIFEST_FILE} (changed or corrupted since it was saved)"
    saved = manifest.get("tensors", {}).get(name)
    if not isinstance(saved, dict):
        return where
    now = tensor_hashes(ckpt / name)
    if now.get(HEADER) != saved.get(HEADER):
        return f"{where}: the header (names, dtypes, shapes or offsets)"
    bad = [k for k in saved if k != HEADER and now.get(k) != saved[k]]
    if bad:
        return f"{where}: tensor {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
    return f"{where}: bytes outside every tensor"


def verify(ckpt: Path, names: Iterable[str] | None = None, *, skip: Iterable[str] = (), note: bool = True) -> bool:
    """Check the files ``names`` (default: every file in the manifest but ``skip``) of ``ckpt`` against
    checksums.json; raise CheckpointError naming the first that differs. A listed file that is
    absent is left to its reader. Without a manifest: False, after a one-line note on stderr."""
    manifest = read_manifest(ckpt)
    if manifest is None:
        if note and str(ckpt) not in _noted:
            _noted.add(str(ckpt))
            print(f"note: {ckpt}: no {MANIFEST_FILE} (saved before content hashes, or by another tool): "
                  "loaded unverified", file=sys.stderr)
        return False
    files: dict[str, str] = manifest["files"]
    for name in names if names is not None else files:
        if name not in skip and name in files and (ckpt / name).is_file() and hash_file(ckpt / name) != files[name]:
            raise CheckpointError(_mismatch(ckpt, manifest, name))
    return True


def report(ckpt: Path) -> list[str]:
    """Every problem ``havoc inspect --verify`` finds, one line each (empty: all files verified)."""
    manifest = read_manifest(ckpt)
    if manifest is None:
        return [f"{ckpt}: no {MANIFEST_FILE}: nothing to verify against"]
    problems = []
    for name, digest in manifest["files"].items():
        if not (ckpt / name).is_file():
            problems.append(f"{ckpt / name}: listed in {MANIFEST_FILE} but missing")
        elif hash_file(ckpt / name) != digest:
            problems.append(_mismatch(ckpt, manifest, name))
    return problems
