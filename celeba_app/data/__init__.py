"""CelebA through flwr-datasets: who holds which rows, and what each row carries.

Clients train on the official ``train`` split and hold out a local validation part; the
server selects on ``valid`` and tests on ``test``. A node's training data is set by its node
config (``NodeData``): a partition of ``dataset`` (partitioning.py), as in simulation, or a
``data-path`` folder that holds only that node's rows (celeba-partition writes them). The
server never reads ``train``: it learns each client's sizes, rates and identities from the
client's reply to a ``query`` message (``describe_node``), and checks the identities against
its own ``valid``/``test`` (``check_clients_disjoint``).

Data is known by its content (``dataset_fingerprint``), never by its path: the fingerprint
keys the ``datasets`` cache of a local folder, the parts cache and every row identity.

Per-process caches: ``load_federated``, ``load_server`` and ``client_parts`` keep what they
build in ``functools.lru_cache`` keyed by their arguments, the whole frozen ``RunConfig``
(and ``NodeData``) included, so no hand-written key can miss a config field; equal configs
(each message builds its own) share an entry. ``clear_caches`` empties them (tests).

The modules, each with one job, from the bottom up (each imports only those above it):

* ``fingerprint``: a dataset's content identity, and the ``datasets`` cache it keys;
* ``schema``: splits, columns and 0/1 values, refused in one line;
* ``bad_images``: which images cannot be decoded, remembered per row;
* ``rows``: the row type ``LabeledRows`` and ``make_part``;
* ``node``: ``NodeData``, where a node's data is;
* ``loading``: flwr-datasets' FederatedDataset of a run, and a ``data-path`` folder;
* ``parts_cache``: a node's parts on disk;
* ``client_parts``: a node's (train, validation) parts and its description for the server;
* ``identities``: identity-disjointness checks;
* ``server``: the server's ``valid`` and ``test``.
"""

from __future__ import annotations

from .bad_images import IMAGES_CHECK_VERSION
from .client_parts import PARTS_VERSION, client_parts, describe_node, make_client_parts, parts_key, partition_summary
from .fingerprint import dataset_fingerprint, datasets_cache_kwargs
from .identities import (check_clients_disjoint, check_clients_distinct, check_identity_disjoint, hide_identities,
                         salted_hashes)
from .loading import load_federated, local_train_split
from .node import PARTITION_META, NodeData, cache_dir_for
from .rows import SPLIT_NAMES, LabeledRows, make_part, split_rows
from .schema import check_binary
from .server import load_server, server_identities, server_part

__all__ = [
    "IMAGES_CHECK_VERSION", "PARTITION_META", "PARTS_VERSION", "SPLIT_NAMES", "LabeledRows", "NodeData",
    "cache_dir_for", "check_binary", "check_clients_disjoint", "check_clients_distinct", "check_identity_disjoint",
    "clear_caches",
    "client_parts", "dataset_fingerprint", "datasets_cache_kwargs", "describe_node", "load_federated",
    "load_server", "local_train_split", "make_client_parts", "make_part", "partition_summary", "parts_key",
    "server_identities", "server_part", "split_rows", "hide_identities", "salted_hashes",
]


def clear_caches() -> None:
    """Forget this process's datasets and parts (``functools.lru_cache``s): tests that rewrite
    a dataset in place, and benchmarks that time a cold load."""
    for cached in (load_federated, load_server, client_parts):
        cached.cache_clear()
