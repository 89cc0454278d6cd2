"""Atomic writes: the previous file or the whole new one, never a torn file or a leftover."""

import pytest

from celeba_app.atomic import atomic_write, atomic_write_bytes


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]


def test_a_failing_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_bytes(path, b"old")

    def half(tmp):
        tmp.write_bytes(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
