"""row_store.RowStore: values by split row, shared by processes, never trusted when damaged."""

import json
import multiprocessing as mp

import numpy as np
import pytest

from celeba_app.row_store import RowStore


def store(tmp_path, n=50, width=4, **meta):
    return RowStore(tmp_path / "s", {"data": "d", "split": "train", **meta}, n, width)


def values(rows, width=4):
    return np.stack([np.full(width, r + 0.5, np.float32) for r in rows])


def test_rows_written_are_read_back_and_others_are_missing(tmp_path):
    s = store(tmp_path)
    rows = np.array([7, 3, 40, 4])
    s.write(rows, values(rows))
    got, have = store(tmp_path).read(np.array([3, 4, 5, 40, 7]))
    assert have.tolist() == [True, True, False, True, True]
    assert np.array_equal(got[have], values([3, 4, 40, 7])) and not got[~have].any()
    assert (tmp_path / "s" / "values.f32").stat().st_blocks * 512 < 50 * 4 * 4 + 8192  # sparse


def test_a_damaged_row_is_missing_and_another_keys_store_is_rebuilt(tmp_path):
    s = store(tmp_path)
    s.write(np.arange(10), values(range(10)))
    with open(tmp_path / "s" / "values.f32", "r+b") as f:
        f.seek(5 * 16)
        f.write(b"\0\0\0\1")
    _, have = s.read(np.arange(10))
    assert have.tolist() == [True] * 5 + [False] + [True] * 4
    other = store(tmp_path, view="hflip")  # same folder, another key: nothing is trusted
    assert not other.read(np.arange(10))[1].any()
    other.write(np.array([1]), values([1]))
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["view"] == "hflip"
    assert other.read(np.arange(3))[1].tolist() == [False, True, False]


def test_a_full_disk_raises_oserror_and_leaves_no_row_marked(tmp_path, monkeypatch):
    import os

    s = store(tmp_path)
    s.write(np.array([0]), values([0]))

    def full(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space left"):
        s.write(np.array([1, 2]), values([1, 2]))
    monkeypatch.undo()
    assert s.read(np.arange(3))[1].tolist() == [True, False, False]


def _writer(root, rows, width):
    s = RowStore(root, {"data": "d", "split": "train"}, 400, width)
    for chunk in np.array_split(np.asarray(rows), 20):
        s.write(chunk, np.stack([np.full(width, r + 0.5, np.float32) for r in chunk]))


def test_concurrent_writers_of_one_store_leave_every_row_sound(tmp_path):
    width = 1280
    ctx = mp.get_context("spawn")
    rng = np.random.default_rng(0)
    jobs = [rng.permutation(300) + k * 100 for k in range(2)]  # rows 0..399, 100..299 written by both
    procs = [ctx.Process(target=_writer, args=(tmp_path / "s", rows, width)) for rows in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got, have = RowStore(tmp_path / "s", {"data": "d", "split": "train"}, 400, width).read(np.arange(400))
    assert have.all() and np.array_equal(got, values(range(400), width))
