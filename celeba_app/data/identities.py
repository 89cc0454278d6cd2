"""Identity checks: no celebrity in two splits, and none of the clients' in ``valid``/``test``."""

from __future__ import annotations

import numpy as np

from ..config import ConfigError, RunConfig
from .loading import load_federated
from .rows import SPLIT_NAMES


def refuse_shared(cfg: RunConfig, ids: dict[str, set[int]]) -> None:
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = ids[a] & ids[b]
            if shared:
                raise ConfigError(
                    f"dataset={cfg.dataset!r}: {len(shared)} identities are in both {a} and {b} "
                    f"(e.g. {sorted(shared)[:3]}); accepted: identity-disjoint splits"
                )

def check_clients_disjoint(cfg: RunConfig, server_ids: dict[str, set[int]], partitions: list[dict]) -> dict[str, int]:
    """The clients' celeb_ids (from their replies) against the server's ``valid``/``test``
    identities; returns the number of identities per split (train = union of the clients')."""
    train = set()
    for entry in partitions:
        train |= set(entry["celeb_ids"])
    refuse_shared(cfg, {"train": train, **server_ids})
    return {"train": len(train), **{s: len(v) for s, v in server_ids.items()}}

def check_identity_disjoint(cfg: RunConfig, num_partitions: int) -> dict[str, int]:
    """Number of identities per split of the whole dataset (train included); raises if any
    celebrity is in two splits. For tools that hold every split (centralized, celeba-partition)."""
    fds = load_federated(cfg, num_partitions)
    ids = {s: set(np.asarray(fds.load_split(s)["celeb_id"]).tolist()) for s in SPLIT_NAMES}
    refuse_shared(cfg, ids)
    return {s: len(v) for s, v in ids.items()}


def check_clients_distinct(partitions: list[dict]) -> None:
    """Refuse (ConfigError, one line) two nodes whose local data has the same content
    fingerprint (describe_node's ``data_fingerprint``): the same rows would train twice."""
    seen: dict[str, dict] = {}
    for entry in partitions:
        fp = entry.get("data_fingerprint")
        if fp is None:
            continue
        if fp in seen:
            other = seen[fp]
            raise ConfigError(
                f"SuperNodes {other.get('node_id')} (partition-id={other['partition_id']}) and {entry.get('node_id')} "
                f"(partition-id={entry['partition_id']}) hold the same data (fingerprint {fp}); accepted: each "
                "SuperNode with its own data (a data-path or partition of its own)")
        seen[fp] = entry
