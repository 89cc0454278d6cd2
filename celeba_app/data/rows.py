"""The row type: a set of rows of one split, with labels, attributes and identities, and how a
``datasets`` selection becomes one (``make_part``: values checked, bad images left out or refused)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from ..config import ConfigError, RunConfig
from ..internals import row_mapping
from .bad_images import undecodable_rows
from .schema import check_binary

if TYPE_CHECKING:  # datasets costs seconds to import: imported where data is read
    from datasets import Dataset


SPLIT_NAMES = ("train", "valid", "test")

@dataclass
class LabeledRows:
    """A set of rows the app computes embeddings for and evaluates on."""

    name: str
    rows: Dataset | None  # None until needed when the part came from the parts cache
    labels: np.ndarray
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    celeb_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    load_rows: Callable[[], Dataset] | None = field(default=None, repr=False)
    #: Rows left out because their image cannot be decoded (``bad-images="skip"``): one dict
    #: per row, {"part", "row" (index in the part before leaving out), "split_row" (index in
    #: the split), "celeb_id", "error"}. The arrays above and ``rows`` no longer hold them.
    skipped_rows: list[dict] = field(default_factory=list)
    #: Where each row lives, the key of the per-row caches (row_store.py): the data's content
    #: fingerprint, the split's name and size, and each row's index in the split (N,) int64.
    data_id: str = ""
    split: str = ""
    split_size: int = 0
    split_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def encoded_images(self, batch_size: int, positions: np.ndarray | None = None) -> Iterator[list[bytes]]:
        """The encoded images, in row order, ``batch_size`` at a time (no decoding here); only
        those at ``positions`` (indices into this part, ascending) when given."""
        from datasets import Image

        if self.rows is None:
            self.rows = self.load_rows()
        rows = self.rows if positions is None else self.rows.select(np.asarray(positions, dtype=np.int64))
        raw = rows.select_columns(["image"]).cast_column("image", Image(decode=False))
        for batch in raw.iter(batch_size=batch_size):
            out = []
            for item in batch["image"]:
                if item.get("bytes") is None:
                    out.append(Path(item["path"]).read_bytes())
                else:
                    out.append(item["bytes"])
            yield out

def split_rows(ds: Dataset) -> np.ndarray:
    """Each row's index in its split (the row mapping left by shuffle/select). Right only for
    a dataset whose table is the whole split: one with a row mapping (every partition, shuffled
    or from ``local_train_split``), or the split itself."""
    indices = row_mapping(ds)
    return indices.column(0).to_numpy() if indices is not None else np.arange(len(ds))

def make_part(cfg: RunConfig, name: str, rows: Dataset, data_id: str, *, source: str, split: str,
              memo_dir: str | None = None, may_be_empty: bool = False) -> LabeledRows:
    """The LabeledRows of ``rows`` of split ``split`` of ``source`` (a dataset spec or data-path): its
    labels and sensitive attributes, refused unless booleans or 0/1 (``check_binary``), and
    its images, each of which must decode (``bad-images``): ``fail`` refuses the first one
    that cannot (ConfigError naming the part, the row and the celeb_id), ``skip`` leaves such
    rows out of the LabeledRows (``LabeledRows.skipped_rows`` lists them; a warning names each).

    The images are checked once per set of rows: the result is kept under
    ``<memo_dir>/checked`` (the rows' identity names it), so a run whose embeddings are cached
    decodes nothing here. ``may_be_empty``: a part that every row may leave (local validation).
    """
    columns = rows.select_columns(["celeb_id", cfg.target, *cfg.sensitive_attributes])
    table = columns.with_format("numpy")[:]
    check_binary(source, split, {c: table[c] for c in (cfg.target, *cfg.sensitive_attributes)})
    part = LabeledRows(
        name=name,
        rows=rows,
        labels=np.asarray(table[cfg.target], dtype=np.int64),
        attributes={a: np.asarray(table[a], dtype=np.int64) for a in cfg.sensitive_attributes},
        celeb_ids=np.asarray(table["celeb_id"], dtype=np.int64),
        data_id=data_id, split=split, split_size=rows.data.num_rows, split_rows=split_rows(rows),
    )
    bad = undecodable_rows(part, memo_dir)
    if not bad:
        return part
    in_split = split_rows(rows)
    found = [{"part": name, "row": r, "split_row": int(in_split[r]), "celeb_id": int(part.celeb_ids[r]),
              "error": error} for r, error in bad]
    where = f"dataset={source!r} split {split!r}" + (f" part {name!r}" if name != split else "")
    first = found[0]
    row = f"row {first['row']} (row {first['split_row']} of the split, celeb_id {first['celeb_id']})"
    if cfg.bad_images == "fail":
        more = f" (and {len(found) - 1} more in this part)" if len(found) > 1 else ""
        raise ConfigError(f"{where} {row}: the image cannot be decoded ({first['error']}){more}; accepted: "
                          "decodable images, or bad-images='skip' to leave such rows out")
    keep = np.setdiff1d(np.arange(len(part)), [r for r, _ in bad])
    if len(keep) == 0 and not may_be_empty:
        raise ConfigError(f"{where}: none of its {len(part)} images can be decoded (e.g. {row}: "
                          f"{first['error']}); accepted: a part with at least one decodable image")
    flwr_log = logging.getLogger("flwr")
    for f in found[:10]:
        flwr_log.warning("celeba-fl: bad-images='skip': left out %s row %d (row %d of split %r of %s, celeb_id %d): "
                         "the image cannot be decoded (%s)", name, f["row"], f["split_row"], split, source,
                         f["celeb_id"], f["error"])
    if len(found) > 10:
        flwr_log.warning("celeba-fl: bad-images='skip': and %d more rows of %s left out", len(found) - 10, name)
    kept = rows.select(keep)
    return LabeledRows(name=name, rows=kept, labels=part.labels[keep],
                attributes={a: v[keep] for a, v in part.attributes.items()}, celeb_ids=part.celeb_ids[keep],
                skipped_rows=found, data_id=data_id, split=split, split_size=part.split_size,
                split_rows=part.split_rows[keep])
