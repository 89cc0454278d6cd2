"""Values kept per row of a dataset split, on disk, shared by every process of one machine.

Why: an embedding (or an image check) belongs to a row of a split, not to a client. Keyed by
row, it is computed once per dataset, whichever partitioning, seed or number of clients later
puts that row in whichever client's part; a client computes only the rows nobody computed
before.

Layout of one store, ``<root>/`` (``root`` names the key, e.g. a digest of dataset
fingerprint, split, weights, image size, runtime and view)::

    meta.json    the key's fields, the number of rows ``n`` and the ``width``
    values.f32   float32 (n, width), row-major: row r at byte r * width * 4 (a sparse file:
                 only written rows take disk space)
    crc.u32      uint32 (n,): zlib.crc32 of each written row's bytes
    filled.u8    uint8 (n,): 1 once row r is written (after its values and checksum)
    ../<name>.lock   flock'ed by writers and by whoever creates or rebuilds the store

Guarantees:

* Writers take an exclusive ``flock``: concurrent processes never interleave a row.
* A reader trusts a row only when ``filled`` says so *and* its checksum matches: a row torn
  by a crash, a damaged file or a file from another store is recomputed, not used.
* A store whose ``meta.json`` differs from the key it is opened for, or whose files have the
  wrong size, is rebuilt (moved aside, then created empty), with a warning.
* Writes use ``os.pwrite``, not a writable memory map: a full disk raises ``OSError``
  (the caller goes on without the cache) instead of killing the process with SIGBUS.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

log = logging.getLogger("flwr")

FILES = ("values.f32", "crc.u32", "filled.u8")


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def row_checksums(values: np.ndarray) -> np.ndarray:
    """uint32 (k,): zlib.crc32 of each row of a C-contiguous float32 (k, width) array."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    return np.fromiter((zlib.crc32(row.tobytes()) for row in values), dtype=np.uint32, count=len(values))


class RowStore:
    """float32 (n, width) values by row index, filled as they are computed (module docstring).

    ``meta``: the key's fields (JSON-serialisable); ``n``: rows in the split; ``width``:
    values per row (an embedding's width, e.g. 4,704 for features[13] pooled 7x7). Raises OSError only from ``write``.
    """

    def __init__(self, root: Path, meta: dict, n: int, width: int) -> None:
        self.root, self.n, self.width = Path(root), int(n), int(width)
        self.meta = {**meta, "n": self.n, "width": self.width}
        self.lock = self.root.with_name(self.root.name + ".lock")
        self.row_bytes = self.width * 4

    # ------------------------------------------------------------------ opening
    def _sound(self) -> bool:
        try:
            if json.loads((self.root / "meta.json").read_text()) != json.loads(json.dumps(self.meta)):
                return False
            sizes = [(self.root / f).stat().st_size for f in FILES]
        except (OSError, ValueError):
            return False
        return sizes == [self.n * self.row_bytes, self.n * 4, self.n]

    def _create(self) -> None:
        """Called under the lock: an empty store (sparse files), replacing an unsound one."""
        if self.root.exists():
            log.warning("celeba-fl: cached rows in %s do not match their key or are damaged; rebuilding them",
                        self.root)
            aside = self.root.with_name(f"{self.root.name}.broken-{os.getpid()}")
            self.root.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        tmp = self.root.with_name(f"{self.root.name}.new-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, size in zip(FILES, (self.n * self.row_bytes, self.n * 4, self.n)):
            with open(tmp / name, "wb") as f:
                f.truncate(size)
        (tmp / "meta.json").write_text(json.dumps(self.meta, sort_keys=True))
        tmp.rename(self.root)

    def _open(self, create: bool) -> bool:
        if self._sound():
            return True
        if not create:
            return False
        with file_lock(self.lock):
            if not self._sound():
                self._create()
        return True

    # ------------------------------------------------------------------ rows
    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values float32 (k, width), have bool (k,)) for row indices ``rows`` (k,): ``have``
        is False for rows never written, torn or damaged (their values are zeros)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(rows), self.width), dtype=np.float32)
        have = np.zeros(len(rows), dtype=bool)
        if len(rows) == 0 or not self._open(create=False):
            return out, have
        if rows.min() < 0 or rows.max() >= self.n:
            raise IndexError(f"row indices must lie in [0, {self.n}); got {rows.min()}..{rows.max()}")
        filled = np.fromfile(self.root / "filled.u8", dtype=np.uint8)[rows].astype(bool)
        if not filled.any():
            return out, have
        values = np.memmap(self.root / "values.f32", dtype=np.float32, mode="r", shape=(self.n, self.width))
        crc = np.fromfile(self.root / "crc.u32", dtype=np.uint32)
        idx = np.flatnonzero(filled)
        out[idx] = values[rows[idx]]
        ok = row_checksums(out[idx]) == crc[rows[idx]]
        if not ok.all():
            log.warning("celeba-fl: %d cached row(s) in %s fail their checksum; computing them again",
                        int((~ok).sum()), self.root)
            out[idx[~ok]] = 0.0
        have[idx[ok]] = True
        return out, have

    def filled(self, rows: np.ndarray) -> np.ndarray:
        """bool (k,): which of ``rows`` were written (checksums not verified: a plan, not a read)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0 or not self._open(create=False):
            return np.zeros(len(rows), dtype=bool)
        return np.fromfile(self.root / "filled.u8", dtype=np.uint8)[rows].astype(bool)

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Store ``values`` float32 (k, width) for row indices ``rows`` (k,): values, then
        checksums, then the filled flags, under the lock. OSError (e.g. a full disk) is raised."""
        rows = np.asarray(rows, dtype=np.int64)
        values = np.ascontiguousarray(values, dtype=np.float32)
        if values.shape != (len(rows), self.width):
            raise ValueError(f"values of shape {values.shape}; expected ({len(rows)}, {self.width})")
        if len(rows) == 0:
            return
        self._open(create=True)
        crc = row_checksums(values)
        order = np.argsort(rows, kind="stable")
        with file_lock(self.lock):
            if not self._sound():  # rebuilt by another process meanwhile
                self._create()
            for name, data, size in (("values.f32", values, self.row_bytes), ("crc.u32", crc, 4),
                                     ("filled.u8", np.ones(len(rows), dtype=np.uint8), 1)):
                fd = os.open(self.root / name, os.O_WRONLY)
                try:
                    for start, stop in _runs(rows[order]):
                        chunk = np.ascontiguousarray(data[order[start:stop]]).tobytes()
                        if os.pwrite(fd, chunk, int(rows[order[start]]) * size) != len(chunk):
                            raise OSError(f"short write to {self.root / name}")
                    if name != "filled.u8":  # values and checksums reach the disk before the flags
                        os.fsync(fd)
                finally:
                    os.close(fd)


def _runs(sorted_rows: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) positions of runs of consecutive row indices in a sorted array."""
    if len(sorted_rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(sorted_rows)]])
    return list(zip(starts.tolist(), stops.tolist()))
