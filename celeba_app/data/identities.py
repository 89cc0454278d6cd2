"""Identity checks: no celebrity in two splits, and none of the clients' in ``valid``/``test``;
and, with DP on, the salted hashes a node describes its identities with instead.

A hash is the first 16 hex digits of sha256("<salt>:<celeb_id>"), with one random salt per
run that the server sends in its query message and never writes down. Two sets hashed with
one salt can be compared (the server's identity check), and whoever reads partitions.json,
the logs or the messages without the salt cannot tell which celebrities a client holds. It
does not hide them from the server itself, which holds the salt and could hash every
CelebA identity (10,177) to invert the hashes: it protects the results and the wire, not
against the server's operator.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

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

def salted_hashes(ids: Iterable[int], salt: str) -> list[str]:
    """``ids`` (celeb_ids) as sorted salted hashes (the module docstring)."""
    return sorted({hashlib.sha256(f"{salt}:{int(i)}".encode()).hexdigest()[:16] for i in ids})


def hide_identities(entry: dict, salt: str) -> dict:
    """A node's description (describe_node's) with ``celeb_id_hashes`` for its ``celeb_ids``
    and no celeb_id in its skipped rows: what a node sends when DP is on."""
    hidden = {k: v for k, v in entry.items() if k != "celeb_ids"}
    hidden["celeb_id_hashes"] = salted_hashes(entry["celeb_ids"], salt)
    if "skipped_rows" in entry:
        hidden["skipped_rows"] = [{k: v for k, v in row.items() if k != "celeb_id"} for row in entry["skipped_rows"]]
    return hidden


def check_clients_disjoint(cfg: RunConfig, server_ids: dict[str, set[int]], partitions: list[dict],
                           salt: str | None = None) -> dict[str, int]:
    """The clients' celeb_ids (from their replies; their ``celeb_id_hashes`` under ``salt``)
    against the server's ``valid``/``test`` identities; returns the number of identities per
    split (train = union of the clients')."""
    train = set()
    for entry in partitions:
        train |= set(entry["celeb_id_hashes"] if salt is not None else entry["celeb_ids"])
    if salt is not None:
        server_ids = {split: set(salted_hashes(ids, salt)) for split, ids in server_ids.items()}
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
