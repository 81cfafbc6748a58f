"""Atomic writes: the old version or the complete new one, never half of either, no temporary left."""

import pytest

from havoc_core.atomic import atomic_open, write_atomic, write_atomic_dir


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = write_atomic(tmp_path / "f.json", "old")
    with pytest.raises(RuntimeError), atomic_open(path, "w") as f:
        f.write("half of the new")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1


def test_a_failed_directory_write_leaves_the_old_directory(tmp_path):
    final = tmp_path / "ckpt"
    write_atomic_dir(final, lambda d: (d / "a").write_text("1"))

    def broken(d):
        (d / "b").write_text("2")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_atomic_dir(final, broken)
    assert [p.name for p in final.iterdir()] == ["a"] and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    write_atomic_dir(final, lambda d: (d / "b").write_text("2"))
    assert [p.name for p in final.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
