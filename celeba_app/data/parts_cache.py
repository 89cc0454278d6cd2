"""A node's two parts on disk: one ``.npz`` per parts key under ``<cache-dir>/parts``.

It stores what a part needs without its dataset (labels, attributes, identities, where each row
lives, the rows left out); the caller gives the loader of the rows themselves, so this module
never calls back into how parts are made.
"""

from __future__ import annotations

import functools
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..atomic import atomic_write_bytes
from .rows import LabeledRows

if TYPE_CHECKING:
    from datasets import Dataset

TAGS = ("train", "val")


def save_parts(path: Path, parts: tuple[LabeledRows, LabeledRows]) -> None:
    """Write the (train, val) parts to ``path``; a full or read-only disk is logged, not raised
    (the cache only saves time)."""
    arrays = {}
    for tag, part in zip(TAGS, parts):
        arrays[f"{tag}|labels"] = part.labels
        arrays[f"{tag}|celeb_ids"] = part.celeb_ids
        arrays[f"{tag}|name"] = np.array(part.name)
        arrays[f"{tag}|skipped"] = np.array(json.dumps(part.skipped_rows))
        arrays[f"{tag}|where"] = np.array(json.dumps([part.data_id, part.split, part.split_size]))
        arrays[f"{tag}|split_rows"] = part.split_rows
        for a, v in part.attributes.items():
            arrays[f"{tag}|attr|{a}"] = v
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        logging.getLogger("flwr").warning("celeba-fl: could not cache the parts (%s); continuing", exc)


def load_parts(path: Path, attributes: tuple[str, ...],
               load_rows: Callable[[int], Dataset]) -> tuple[LabeledRows, LabeledRows] | None:
    """The (train, val) parts stored at ``path``, with ``attributes``; their ``rows`` are None
    until needed, then ``load_rows(0)`` (train) or ``load_rows(1)`` (val). None when there is no
    file, or one that cannot be read or is from another version (logged: rebuilt, never trusted)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            out = []
            for which, tag in enumerate(TAGS):
                data_id, split, split_size = json.loads(str(z[f"{tag}|where"]))
                out.append(LabeledRows(
                    data_id=data_id, split=split, split_size=split_size, split_rows=z[f"{tag}|split_rows"],
                    name=str(z[f"{tag}|name"]), rows=None,
                    labels=z[f"{tag}|labels"], celeb_ids=z[f"{tag}|celeb_ids"],
                    attributes={a: z[f"{tag}|attr|{a}"] for a in attributes},
                    load_rows=functools.partial(load_rows, which),
                    skipped_rows=json.loads(str(z[f"{tag}|skipped"])),
                ))
    except Exception as exc:  # noqa: BLE001 - unreadable or from another version: rebuilt
        logging.getLogger("flwr").warning("celeba-fl: parts cache %s is unusable (%s); rebuilding", path, exc)
        return None
    return out[0], out[1]
