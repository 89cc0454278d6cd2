"""Data known by its content, never by its path.

``datasets`` 3.1 caches a local folder under its *name*, so two folders of one name would share
a cache; the fingerprint keys that cache (``datasets_cache_kwargs``), the parts cache and every
row identity instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from ..atomic import atomic_write_bytes
from ..config import is_local_path



def dataset_fingerprint(spec: str, memo_dir: str | Path | None = None) -> str:
    """Identity of a dataset by its content, never by its path.

    A local folder's fingerprint is the sha256 over every file's relative name, size and
    content sha256 (``datasets`` 3.1 caches a local folder under its *name*, so two folders of
    one name would otherwise share data). Content hashes are memoised in ``memo_dir`` under
    (absolute path, size, mtime, inode), so a process that only needs the key (a ClientApp
    answering a later round from its caches) stats the files instead of reading them.
    A hub dataset is known by its name (``hub:<owner/name>``).
    """
    if not is_local_path(spec):
        return f"hub:{spec}"
    root = Path(spec).expanduser().resolve()
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not is_hidden(p, root)):
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}|{st.st_size}|{_content_sha(path, st, memo_dir)}\n".encode())
    return h.hexdigest()

def is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)

def _content_sha(path: Path, st: os.stat_result, memo_dir: str | Path | None) -> str:
    memo = None
    if memo_dir is not None:
        key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode()).hexdigest()
        memo = Path(memo_dir) / "fingerprints" / key
        if memo.is_file():
            return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        try:
            atomic_write_bytes(memo, digest.encode())
        except OSError as exc:  # a memo only: a full or read-only disk costs time
            logging.getLogger("flwr").warning("celeba-fl: could not record a fingerprint (%s); continuing", exc)
    return digest

def datasets_cache_kwargs(spec: str, fingerprint: str) -> dict:
    """``datasets.load_dataset`` arguments: a local folder gets a cache of its own content."""
    from datasets import config as hf_config

    if not fingerprint.startswith("hub:"):
        return {"cache_dir": str(Path(hf_config.HF_DATASETS_CACHE) / "celeba-fl" / fingerprint[:24])}
    return {}
