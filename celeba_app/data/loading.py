"""Loading CelebA with flwr-datasets: the partitioned ``train`` split of a run's dataset, and a
``data-path`` node's own folder, with one clear line when the data cannot be loaded or read.

Per-process caches (``functools.lru_cache``) are keyed by the whole frozen ``RunConfig``.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import ConfigError, HUB_DATASET, RunConfig, is_local_path
from .fingerprint import dataset_fingerprint, datasets_cache_kwargs, is_hidden
from .node import NodeData, cache_dir_for
from .rows import SPLIT_NAMES
from ..internals import prepared_splits, select_with_row_mapping
from .schema import check_schema, check_split_values

if TYPE_CHECKING:
    from datasets import Dataset
    from flwr_datasets import FederatedDataset


def new_fds(spec: str, partitioners: dict, shuffle: bool, seed: int, memo_dir: str | None,
             splits: tuple[str, ...] | None = None) -> FederatedDataset:
    """flwr-datasets' FederatedDataset over ``spec``. ``splits``: of a local folder, prepare
    only these (``datasets`` otherwise converts every split it finds, the server's untouched
    ``train`` included: memory and time that grow with the clients' data)."""
    from flwr_datasets import FederatedDataset

    kwargs = datasets_cache_kwargs(spec, dataset_fingerprint(spec, memo_dir))
    if splits and is_local_path(spec):
        root = Path(spec).expanduser().resolve()
        files = {s: sorted(str(p) for p in root.rglob(f"{s}-*.parquet") if not is_hidden(p, root)) for s in splits}
        if all(files.values()):  # else load as before, and let the schema check name what is missing
            kwargs["data_files"] = files
    with warnings.catch_warnings():
        # flwr-datasets warns about any dataset outside its tested list; ours is known.
        warnings.filterwarnings("ignore", message="The currently tested dataset")
        return FederatedDataset(dataset=spec, partitioners=partitioners, shuffle=shuffle, seed=seed, **kwargs)

def load_split(cfg: RunConfig, fds: FederatedDataset, spec: str, split: str) -> Dataset:
    """``fds.load_split(split)`` with one clear line when the dataset cannot be loaded."""
    try:
        return fds.load_split(split)
    except ConfigError:
        raise
    except Exception as exc:
        if prepared_splits(fds) is not None and split not in prepared_splits(fds):
            raise ConfigError(f"dataset={spec!r} lacks split {split!r} (has: {sorted(prepared_splits(fds))}); "
                              f"accepted: a dataset with a {split} split") from exc
        where = "a folder of parquet files" if is_local_path(spec) else "the Hugging Face hub"
        raise ConfigError(
            f"dataset={spec!r} could not be loaded from {where} "
            f"({type(exc).__name__}: {str(exc)[:200]}); accepted: {HUB_DATASET!r} with a "
            "network, or a local folder with train/valid/test parquet files in its schema"
        ) from exc

@functools.lru_cache(maxsize=4)  # a long-running process may serve several runs' configs
def load_federated(cfg: RunConfig, num_partitions: int) -> FederatedDataset:
    """The FederatedDataset for this config, its ``train`` split partitioned into
    ``num_partitions`` (cached per process); ConfigError naming the problem: a missing split or
    column, values that are not 0/1, more partitions than rows or identities."""
    from ..partitioning import build_partitioner

    fds = new_fds(cfg.dataset, {"train": build_partitioner(cfg, num_partitions)}, True, cfg.seed,
                   cache_dir_for(cfg, None))
    train = load_split(cfg, fds, cfg.dataset, "train")
    check_schema(cfg, fds, SPLIT_NAMES)
    if num_partitions > len(train):  # some client would get no row (iid: an IndexError inside flwr-datasets)
        raise ConfigError(f"num-partitions={num_partitions} is more than the {len(train)} rows of "
                          f"dataset={cfg.dataset!r} split 'train'; accepted: at most {len(train)} "
                          "partitions (every client needs at least one row)")
    if cfg.split == "celebrity":  # one partition per identity
        n_ids = len(np.unique(np.asarray(train["celeb_id"])))
        if n_ids != num_partitions:
            raise ConfigError(
                f"split='celebrity' makes one partition per identity: dataset={cfg.dataset!r} has {n_ids} "
                f"identities in train, but num-partitions={num_partitions}; accepted: num-partitions="
                f"{n_ids} (in simulation: --federation-config \"options.num-supernodes={n_ids}\")")
    # The whole split, so every client refuses alike; the noniid partitioner groups by these.
    binary = [cfg.target, *cfg.sensitive_attributes]
    if cfg.split == "noniid":
        binary += [a for a in cfg.noniid_attributes if a not in binary]
    check_split_values(cfg.dataset, "train", train, binary, cache_dir_for(cfg, None))
    return fds

def local_train_split(cfg: RunConfig, node: NodeData) -> Dataset:
    """A ``data-path`` node's whole ``train`` split, in the folder's row order (no shuffle:
    celeba-partition wrote the rows in the order the simulation's partition has them)."""
    from flwr_datasets.partitioner import IidPartitioner

    fds = new_fds(node.data_path, {"train": IidPartitioner(num_partitions=1)}, False, cfg.seed, node.cache_dir)
    train = load_split(cfg, fds, node.data_path, "train")
    check_schema(cfg, fds, ("train",), node.data_path)
    check_split_values(node.data_path, "train", train, [cfg.target, *cfg.sensitive_attributes], node.cache_dir)
    if len(train) == 0:
        raise ConfigError(f"data-path={node.data_path!r} split 'train' has no rows; accepted: a folder "
                          "with this node's training rows, e.g. one written by celeba-partition")
    whole = fds.load_partition(0, "train")
    # An explicit row mapping: datasets turns a contiguous select on a dataset without one into
    # a *slice* of its table, whose rows then restart at 0, and LabeledRows.split_rows (the key of the
    # per-row caches) would name the wrong rows of the split.
    return select_with_row_mapping(whole, range(len(whole)))
