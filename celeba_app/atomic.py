"""Atomic file writes, the one way the app writes a file others read: to a temporary name in the
same folder, then a rename, so a reader never sees a torn file and a crash or kill mid-write
leaves the previous file (or none)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable


def temporary_name(path: Path) -> Path:
    """A temporary name beside ``path``, unique to this process and thread: two writers of one
    file (the round loop and a signal's exit handler) never share a half-written file."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` writes the whole file at a temporary name, then it is renamed to
    ``path`` (its folder is created if needed); on any failure the temporary file is removed
    and the error raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """``payload`` to ``path``, atomically (``atomic_write``)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))
