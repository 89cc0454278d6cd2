"""A node's local (train, validation) parts and what the node tells the server about them."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np

from ..config import ConfigError, RunConfig
from . import parts_cache
from .fingerprint import dataset_fingerprint
from .loading import load_federated, local_train_split
from .node import NodeData
from .rows import LabeledRows, make_part


#: Bump when what the parts cache stores, or how parts are made, changes.
PARTS_VERSION = "4"


@functools.lru_cache(maxsize=None)  # one simulation actor serves many partitions; parts are small
def client_parts(cfg: RunConfig, node: NodeData) -> tuple[LabeledRows, LabeledRows]:
    """A node's local (train, validation) parts: its partition or its ``data-path`` folder,
    with ``val-fraction`` held out (by identity when the partitioning is by identity).

    Cached per process, and on disk under ``<cache-dir>/parts`` (labels, attributes,
    identities and row identities, keyed by the data's content fingerprint and everything
    that shapes the parts: ``parts_key``): a ClientApp process that starts for one message
    (the Deployment Engine starts one per message) then opens no dataset unless an embedding
    is missing. A cached part's rows are loaded when first needed, by ``make_client_parts``.
    """
    if not node.cache_dir:
        return make_client_parts(cfg, node)
    path = Path(node.cache_dir) / "parts" / f"{parts_key(cfg, node)}.npz"
    parts = parts_cache.load_parts(path, cfg.sensitive_attributes,
                                   load_rows=lambda which: make_client_parts(cfg, node)[which].rows)
    if parts is None:
        parts = make_client_parts(cfg, node)
        parts_cache.save_parts(path, parts)
    return parts


def parts_key(cfg: RunConfig, node: NodeData) -> str:
    """The parts cache's key: the data's content fingerprint and every setting that shapes a
    node's parts (bump ``PARTS_VERSION`` when how parts are made changes)."""
    source = node.data_path or cfg.dataset
    spec = {
        "version": PARTS_VERSION, "data": dataset_fingerprint(source, node.cache_dir),
        "data_path": node.data_path is not None, "partition_id": node.partition_id,
        "num_partitions": node.num_partitions, "by_identity": node.holdout_by_identity,
        "val_fraction": cfg.val_fraction, "seed": cfg.seed, "target": cfg.target,
        "sensitive": cfg.sensitive_attributes, "bad_images": cfg.bad_images,
    }
    if node.data_path is None:
        spec.update(split=cfg.split, alpha=cfg.noniid_alpha, noniid=cfg.noniid_attributes)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]

def make_client_parts(cfg: RunConfig, node: NodeData) -> tuple[LabeledRows, LabeledRows]:
    """``client_parts`` built from the data, without any cache."""
    from ..partitioning import local_split

    if node.data_path is None:
        try:
            partition = load_federated(cfg, node.num_partitions).load_partition(node.partition_id, "train")
        except ConfigError:
            raise
        except ValueError as exc:  # the partitioner's refusal, e.g. more clients than identities
            raise ConfigError(f"{exc} (num-partitions={node.num_partitions})") from exc
    else:
        partition = local_train_split(cfg, node)
    train_idx, val_idx = local_split(partition, cfg.val_fraction, by_identity=node.holdout_by_identity,
                                     seed=cfg.seed + node.partition_id)
    pid, data_id = node.partition_id, dataset_fingerprint(node.data_path or cfg.dataset, node.cache_dir)
    source, memo = node.data_path or cfg.dataset, node.cache_dir
    return (make_part(cfg, f"client-{pid}/train", partition.select(train_idx), data_id, source=source,
                      split="train", memo_dir=memo),
            make_part(cfg, f"client-{pid}/val", partition.select(val_idx), data_id, source=source,
                      split="train", memo_dir=memo, may_be_empty=True))

def describe_node(cfg: RunConfig, node: NodeData) -> dict:
    """What a node tells the server about its data (a partitions.json entry): sizes of its
    local parts, target and group rates, and its celeb_ids (for the server's identity check)."""
    train, val = client_parts(cfg, node)
    labels = np.concatenate([train.labels, val.labels])
    return {
        "partition_id": node.partition_id,
        "num_partitions": node.num_partitions,
        "source": node.describe(cfg),
        "num_train": len(train),
        "num_val": len(val),
        "target_rate": float(labels.mean()) if len(labels) else None,
        "group_rates": {
            a: float(np.concatenate([train.attributes[a], val.attributes[a]]).mean()) if len(labels) else None
            for a in cfg.sensitive_attributes
        },
        "celeb_ids": sorted(set(np.concatenate([train.celeb_ids, val.celeb_ids]).tolist())),
        "data_fingerprint": parts_fingerprint(train, val),
        "skipped_rows": train.skipped_rows + val.skipped_rows,  # bad-images='skip'
    }


def parts_fingerprint(*parts: LabeledRows) -> str:
    """The content identity of a node's local data: a hash of its parts' dataset fingerprint,
    split and row indices (LabeledRows' cache key), so two nodes that read the same rows of
    the same data have the same one, whatever partition-id they claim."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(f"{part.data_id}|{part.split}|{part.split_size}|{len(part)}|".encode())
        digest.update(np.asarray(part.split_rows, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]

def partition_summary(cfg: RunConfig, num_partitions: int) -> list[dict]:
    """``describe_node`` for every partition (tools that hold every split)."""
    return [describe_node(cfg, NodeData.partition(cfg, pid, num_partitions)) for pid in range(num_partitions)]
