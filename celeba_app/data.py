"""CelebA through flwr-datasets: who holds which rows, and what each row carries.

Clients train on the official ``train`` split (partitioned, see partitioning.py) and hold out a
local validation part; the server selects on ``valid`` and tests on ``test``. The hub's splits
are identity-disjoint, and ``check_identity_disjoint`` verifies it for any dataset at start.

``_FDS`` is this module's documented per-process cache: one FederatedDataset (and so one
partitioning) per configuration, built on the first message a process handles and reused
for every later message and client in that process.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from datasets import Dataset, Image
from flwr_datasets import FederatedDataset

from .config import ConfigError, HUB_DATASET, RunConfig, is_local_path
from .features import numpy_rows_digest
from .partitioning import build_partitioner, local_split

SPLIT_NAMES = ("train", "valid", "test")

#: Per-process caches: FederatedDataset objects keyed by what shapes the partitioning, and
#: each client's parts (so a message costs no re-reading of labels or row identities).
_FDS: dict[tuple, FederatedDataset] = {}
_PARTS: dict[tuple, tuple["Part", "Part"]] = {}


@dataclass
class Part:
    """A set of rows the app computes embeddings for and evaluates on."""

    name: str
    rows: Dataset
    rows_id: str
    labels: np.ndarray
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    celeb_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def blobs(self, batch_size: int) -> Iterator[list[bytes]]:
        """The encoded images, in row order, ``batch_size`` at a time (no decoding here)."""
        raw = self.rows.select_columns(["image"]).cast_column("image", Image(decode=False))
        for batch in raw.iter(batch_size=batch_size):
            out = []
            for item in batch["image"]:
                if item.get("bytes") is None:
                    out.append(Path(item["path"]).read_bytes())
                else:
                    out.append(item["bytes"])
            yield out


def clear_caches() -> None:
    """Forget this process's datasets and parts (tests)."""
    _FDS.clear()
    _PARTS.clear()


def _fds_key(cfg: RunConfig, num_partitions: int) -> tuple:
    return (cfg.dataset, cfg.split, num_partitions, cfg.noniid_alpha, cfg.noniid_attributes, cfg.seed)


def load_federated(cfg: RunConfig, num_partitions: int) -> FederatedDataset:
    """The FederatedDataset for this config (cached per process); clear errors on failure."""
    key = _fds_key(cfg, num_partitions)
    if key not in _FDS:
        with warnings.catch_warnings():
            # flwr-datasets warns about any dataset outside its tested list; ours is known.
            warnings.filterwarnings("ignore", message="The currently tested dataset")
            fds = FederatedDataset(
                dataset=cfg.dataset,
                partitioners={"train": build_partitioner(cfg, num_partitions)},
                shuffle=True,
                seed=cfg.seed,
            )
            try:
                fds.load_split("train")
            except Exception as exc:
                where = "a folder of parquet files" if is_local_path(cfg.dataset) else "the Hugging Face hub"
                raise ConfigError(
                    f"dataset={cfg.dataset!r} could not be loaded from {where} "
                    f"({type(exc).__name__}: {str(exc)[:200]}); accepted: {HUB_DATASET!r} with a "
                    "network, or a local folder with train/valid/test parquet files in its schema"
                ) from exc
        _check_schema(cfg, fds)
        _FDS[key] = fds
    return _FDS[key]


def _check_schema(cfg: RunConfig, fds: FederatedDataset) -> None:
    """Splits and columns the app needs, named in one line if missing."""
    splits = set(fds._dataset.keys())  # noqa: SLF001 - prepared by load_split above
    missing = [s for s in SPLIT_NAMES if s not in splits]
    if missing:
        raise ConfigError(
            f"dataset={cfg.dataset!r} lacks split(s) {missing}; accepted: a dataset with splits "
            f"{', '.join(SPLIT_NAMES)}"
        )
    columns = set(fds.load_split("train").column_names)
    need = {"image", "celeb_id", cfg.target, *cfg.sensitive_attributes}
    if cfg.split == "noniid":
        need |= set(cfg.noniid_attributes)
    lacking = sorted(need - columns)
    if lacking:
        raise ConfigError(
            f"dataset={cfg.dataset!r} lacks column(s) {lacking}; accepted: the flwrlabs/celeba "
            "schema (image, celeb_id, 40 attributes)"
        )


def rows_identity(ds: Dataset) -> str:
    """Identity of exactly these rows of exactly this data, for the feature cache: the arrow
    cache files behind the dataset (their names carry the data files' hash or the hub
    revision) and the original row indices (hence split, partitioning and client id)."""
    files = [(Path(f["filename"]).name, Path(f["filename"]).stat().st_size) for f in ds.cache_files]
    indices = ds._indices  # noqa: SLF001 - the row mapping left by shuffle/select
    rows = indices.column(0).to_numpy() if indices is not None else np.arange(len(ds))
    ids = np.asarray(ds["celeb_id"], dtype=np.int64)
    return numpy_rows_digest(np.frombuffer(repr(files).encode(), dtype=np.uint8), rows, ids)


def make_part(cfg: RunConfig, name: str, rows: Dataset) -> Part:
    columns = rows.select_columns(["celeb_id", cfg.target, *cfg.sensitive_attributes])
    table = columns.with_format("numpy")[:]
    return Part(
        name=name,
        rows=rows,
        rows_id=rows_identity(rows),
        labels=np.asarray(table[cfg.target], dtype=np.int64),
        attributes={a: np.asarray(table[a], dtype=np.int64) for a in cfg.sensitive_attributes},
        celeb_ids=np.asarray(table["celeb_id"], dtype=np.int64),
    )


def client_parts(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[Part, Part]:
    """A client's local (train, validation) parts of its partition of the train split."""
    key = (*_fds_key(cfg, num_partitions), partition_id, cfg.val_fraction, cfg.target,
           cfg.sensitive_attributes)
    if key not in _PARTS:
        _PARTS[key] = _client_parts(cfg, partition_id, num_partitions)
    return _PARTS[key]


def _client_parts(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[Part, Part]:
    fds = load_federated(cfg, num_partitions)
    partition = fds.load_partition(partition_id, "train")
    train_idx, val_idx = local_split(
        partition, cfg.val_fraction, by_identity=cfg.split == "noniid", seed=cfg.seed + partition_id
    )
    return (
        make_part(cfg, f"client-{partition_id}/train", partition.select(train_idx)),
        make_part(cfg, f"client-{partition_id}/val", partition.select(val_idx)),
    )


def server_part(cfg: RunConfig, split: str, num_partitions: int) -> Part:
    """The server's ``valid`` or ``test`` split."""
    if split not in ("valid", "test"):
        raise ValueError(f"split={split!r}; accepted: valid, test")
    return make_part(cfg, split, load_federated(cfg, num_partitions).load_split(split))


def check_identity_disjoint(cfg: RunConfig, num_partitions: int) -> dict[str, int]:
    """Number of identities per split; raises if any celebrity is in two splits."""
    fds = load_federated(cfg, num_partitions)
    ids = {s: set(np.asarray(fds.load_split(s)["celeb_id"]).tolist()) for s in SPLIT_NAMES}
    for i, a in enumerate(SPLIT_NAMES):
        for b in SPLIT_NAMES[i + 1:]:
            shared = ids[a] & ids[b]
            if shared:
                raise ConfigError(
                    f"dataset={cfg.dataset!r}: {len(shared)} identities are in both {a} and {b} "
                    f"(e.g. {sorted(shared)[:3]}); accepted: identity-disjoint splits"
                )
    return {s: len(v) for s, v in ids.items()}


def partition_summary(cfg: RunConfig, num_partitions: int) -> list[dict]:
    """For every client: sizes of its local parts, its celeb_ids, target and group rates."""
    out = []
    for pid in range(num_partitions):
        train, val = client_parts(cfg, pid, num_partitions)
        labels = np.concatenate([train.labels, val.labels])
        entry = {
            "partition_id": pid,
            "num_train": len(train),
            "num_val": len(val),
            "target_rate": float(labels.mean()) if len(labels) else None,
            "group_rates": {
                a: float(np.concatenate([train.attributes[a], val.attributes[a]]).mean())
                for a in cfg.sensitive_attributes
            },
            "celeb_ids": sorted(set(np.concatenate([train.celeb_ids, val.celeb_ids]).tolist())),
        }
        out.append(entry)
    return out
