"""The server's own data: the ``valid`` and ``test`` splits, never ``train``."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from ..config import RunConfig
from .fingerprint import dataset_fingerprint
from .identities import refuse_shared
from .loading import load_split, new_fds
from .node import cache_dir_for
from .rows import LabeledRows, make_part
from .schema import check_schema, check_split_values

if TYPE_CHECKING:
    from flwr_datasets import FederatedDataset


@functools.lru_cache(maxsize=4)
def load_server(cfg: RunConfig) -> FederatedDataset:
    """The server's own evaluation data: the ``valid`` and ``test`` splits of ``dataset``
    (cached per process). Its ``train`` split, if any, is never read: the server knows the
    clients only through their replies (a folder with only valid and test, as celeba-partition
    writes, is enough)."""
    fds = new_fds(cfg.dataset, {}, True, cfg.seed, cache_dir_for(cfg, None), splits=("valid", "test"))
    load_split(cfg, fds, cfg.dataset, "valid")
    check_schema(cfg, fds, ("valid", "test"))
    for split in ("valid", "test"):  # refused here, before the server waits for any node
        check_split_values(cfg.dataset, split, fds.load_split(split), [cfg.target, *cfg.sensitive_attributes],
                            cache_dir_for(cfg, None))
    return fds

def server_part(cfg: RunConfig, split: str) -> LabeledRows:
    """The server's ``valid`` or ``test`` split (``split``) as LabeledRows, checked like a
    client's part (labels, attributes, images per ``bad-images``). Raises ConfigError naming the
    problem (e.g. a split that is missing or empty, or an undecodable image with
    ``bad-images='fail'``)."""
    if split not in ("valid", "test"):
        raise ValueError(f"split={split!r}; accepted: valid, test")
    memo = cache_dir_for(cfg, None)
    data_id = dataset_fingerprint(cfg.dataset, memo)
    return make_part(cfg, split, load_server(cfg).load_split(split), data_id, source=cfg.dataset, split=split,
                     memo_dir=memo)

def server_identities(cfg: RunConfig) -> dict[str, set[int]]:
    """celeb_ids of ``valid`` and ``test``; raises if a celebrity is in both."""
    fds = load_server(cfg)
    ids = {s: set(np.asarray(fds.load_split(s)["celeb_id"]).tolist()) for s in ("valid", "test")}
    refuse_shared(cfg, ids)
    return ids
