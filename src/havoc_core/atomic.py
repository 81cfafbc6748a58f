"""Atomic writes: a file or a directory appears complete under its final name, or not at all.

Everything HAVOC writes that a later run reads back (checkpoints, token shards, JSONL, results)
goes through here: written beside the target, fsynced, then renamed into place, so a crash or a
``kill -9`` at any moment leaves the old version or the complete new one, never half of either.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a rename lives in the directory's own data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` for a writer that opens the file itself; on a clean exit it
    is fsynced and renamed to ``path``, on an exception it is deleted and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open(path, mode)`` on a temporary sibling, renamed to ``path`` on a clean exit (``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def publish_dir(tmp: Path, final: str | Path) -> Path:
    """Fsync the finished directory ``tmp`` and rename it to ``final`` (replacing an old one), so a
    crash at any moment leaves either the old directory or the complete new one under ``final``."""
    final = Path(final)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    try:
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_atomic_dir(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` in a temporary sibling, then ``publish_dir`` it to ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        return publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
