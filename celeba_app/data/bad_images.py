"""The bad-image check: which images of a part cannot be decoded, decoded once per row of the
split and remembered under ``<cache-dir>/checked``."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import atomic_write_bytes

if TYPE_CHECKING:
    from .rows import LabeledRows


#: Bump when what makes an image undecodable changes: every part's images are checked again.
IMAGES_CHECK_VERSION = "2"

def undecodable_rows(part: LabeledRows, memo_dir: str | None) -> list[tuple[int, str]]:
    """(row, reason) of the part's images that cannot be decoded (features.undecodable): one
    decode per image, remembered per row of the split under ``<memo_dir>/checked``
    (row_store.py: 1.0 for a row that cannot be decoded, whose reason goes to ``reasons.json``
    beside it), so another partitioning of the same data decodes nothing again."""
    from ..images import undecodable
    from ..row_store import RowStore, file_lock

    if len(part) == 0:
        return []
    store = None
    if memo_dir and part.split_size:
        key = {"data": part.data_id, "split": part.split, "version": IMAGES_CHECK_VERSION}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        store = RowStore(Path(memo_dir) / "checked" / digest, key, part.split_size, width=1)
    values, have = store.read(part.split_rows) if store else (np.zeros((len(part), 1), np.float32),
                                                              np.zeros(len(part), bool))
    reasons = _read_reasons(store) if store is not None and (values[have, 0] > 0).any() else {}
    found = {}
    for pos in np.flatnonzero(have & (values[:, 0] > 0)):
        found[int(pos)] = reasons.get(str(int(part.split_rows[pos])), "cannot be decoded")
    todo = np.flatnonzero(~have)
    new = {int(todo[i]): reason for i, reason in undecodable(part.encoded_images(64, todo))} if len(todo) else {}
    found.update(new)
    if store is not None and len(todo):
        try:
            with file_lock(store.lock.with_suffix(".reasons.lock")):
                merged = {**_read_reasons(store), **{str(int(part.split_rows[p])): r for p, r in new.items()}}
                if new:
                    atomic_write_bytes(store.root.with_name(store.root.name + ".reasons.json"),
                                       json.dumps(merged).encode())
            store.write(part.split_rows[todo], np.array([[float(int(t) in new)] for t in todo], np.float32))
        except OSError as exc:  # a memo only: a full or read-only disk costs time
            logging.getLogger("flwr").warning("celeba-fl: could not record the image check (%s); continuing", exc)
    return sorted(found.items())

def _read_reasons(store) -> dict[str, str]:
    """{split row (str): reason} of the rows an image check found undecodable."""
    try:
        return json.loads(store.root.with_name(store.root.name + ".reasons.json").read_text())
    except (OSError, ValueError):
        return {}
