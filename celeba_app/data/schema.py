"""The dataset's schema and values: the splits and columns the app needs, and labels and
attributes that are booleans or 0/1; each refusal is one line naming the dataset, split and column."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

from ..config import ConfigError, RunConfig, is_local_path
from ..internals import prepared_splits
from .fingerprint import dataset_fingerprint, datasets_cache_kwargs

if TYPE_CHECKING:
    from datasets import Dataset
    from flwr_datasets import FederatedDataset


def check_schema(cfg: RunConfig, fds: FederatedDataset, splits: tuple[str, ...], spec: str | None = None) -> None:
    """Splits and columns the app needs, named in one line if missing."""
    spec = spec or cfg.dataset
    have = set(prepared_splits(fds).keys())  # prepared by load_split above
    missing = [s for s in splits if s not in have]
    if missing:
        raise ConfigError(
            f"dataset={spec!r} lacks split(s) {missing}; accepted: a dataset with splits "
            f"{', '.join(splits)}"
        )
    need = {"image", "celeb_id", cfg.target, *cfg.sensitive_attributes}
    if cfg.split == "noniid" and "train" in splits:
        need |= set(cfg.noniid_attributes)
    for split in splits:
        lacking = sorted(need - set(prepared_splits(fds)[split].column_names))
        if lacking:
            raise ConfigError(
                f"dataset={spec!r} split {split!r} lacks column(s) {lacking}; accepted: the "
                "flwrlabs/celeba schema (image, celeb_id, 40 attributes)"
            )

def check_binary(spec: str, split: str, columns: Mapping[str, np.ndarray]) -> None:
    """Refuse (one line naming the dataset, split, column and the distinct values found) a
    label or attribute column that is not booleans or integers 0/1: e.g. the -1/1 of the
    original list_attr_celeba.txt, which would otherwise train and test on garbage silently."""
    for column, values in columns.items():
        v = np.asarray(values)
        if v.dtype == np.bool_ or v.size == 0:  # an empty part (e.g. no local validation) reads as float
            continue
        if v.dtype.kind in "iu":
            found = np.unique(v).tolist()
            if set(found) <= {0, 1}:
                continue
        else:
            try:
                found = np.unique(v).tolist()
            except TypeError:  # mixed Python objects (e.g. None among booleans)
                found = sorted(set(v.tolist()), key=lambda x: (type(x).__name__, repr(x)))
        shown = ", ".join(repr(x) for x in found[:10]) + (f", ... ({len(found)} in all)" if len(found) > 10 else "")
        raise ConfigError(f"dataset={spec!r} split {split!r} column {column!r} has values [{shown}]; "
                          "accepted: booleans or 0/1")

def check_split_values(spec: str, split: str, ds: Dataset, columns: list[str], memo_dir: str | None) -> None:
    """``check_binary`` over the named columns of a whole split (no image is read): as a local
    folder's parquet files hold them, then as ``datasets`` reads them. The files first because
    ``datasets`` casts every split of a folder to the first split's column types, so an
    integer -1/1 split next to a boolean train split would read as all True."""
    if is_local_path(spec):
        import pyarrow.parquet as pq
        from datasets import load_dataset_builder

        fingerprint = dataset_fingerprint(spec, memo_dir)
        files = load_dataset_builder(spec, **datasets_cache_kwargs(spec, fingerprint)).config.data_files
        for path in files.get(split, []):
            if str(path).endswith(".parquet"):
                have = set(pq.read_schema(path).names)
                raw = pq.read_table(path, columns=[c for c in columns if c in have])
                check_binary(spec, split, {c: raw.column(c).to_numpy(zero_copy_only=False)
                                           for c in raw.column_names})
    table = ds.select_columns(columns).with_format("numpy")[:]
    check_binary(spec, split, {c: table[c] for c in columns})
