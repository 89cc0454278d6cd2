"""How the official train split is spread over clients.

* ``iid``: flwr-datasets' ``IidPartitioner`` (uniform random, same size per client).
* ``noniid``: ``IdentityDirichletPartitioner`` below. Every image of a celebrity lives on
  exactly one client. A random grouping of ~8,000 identities into 50 clients would be nearly
  IID, so the skew is made real and controllable: each client draws a demographic mix from
  Dirichlet(alpha) over the groups of ``group_attributes`` (Male x Young by default) and is
  given identities of each group in proportion to its mix. Small alpha gives clients dominated
  by one group (label and quantity skew follow); large alpha approaches a random identity
  grouping.
* ``celebrity``: flwr-datasets' ``NaturalIdPartitioner(partition_by="celeb_id")``: one
  partition per identity, LEAF's CelebA setting (Caldas et al. 2018), the most extreme skew.
  It needs one SuperNode per identity (3,800 in celeba-10k's train split, 8,192 in the hub's)
  and samples a few of them per round through ``fraction-train``.

Each client then holds out a local validation part (``local_split``), by identity when the
partition is by identity so that no celebrity is in both of a client's parts.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import IidPartitioner, NaturalIdPartitioner, Partitioner

from .config import RunConfig


class IdentityDirichletPartitioner(Partitioner):
    """Partition by identity, with a Dirichlet(alpha) demographic mix per client.

    ``partition_by``: the identity column (flwr-datasets' name, as in NaturalIdPartitioner);
    all rows of one identity go to one partition. ``group_attributes``: the binary columns
    whose cells (e.g. Male x Young, 4 cells) get a Dirichlet(``alpha``) share per client:
    small alpha, each client mostly one cell; large alpha, every client near the global mix.

    Guarantees (tested): every row is in exactly one partition; no identity is in two
    partitions; no partition is empty; the same seed gives the same partitions.
    Raises ValueError for ``num_partitions`` < 1 or ``alpha`` <= 0, and (on loading) for
    more partitions than identities.
    """

    def __init__(
        self,
        num_partitions: int,
        alpha: float = 0.5,
        partition_by: str = "celeb_id",
        group_attributes: tuple[str, ...] = ("Male", "Young"),
        seed: int = 42,
    ) -> None:
        super().__init__()
        if num_partitions < 1:
            raise ValueError(f"num_partitions={num_partitions} is not valid; accepted: >= 1")
        if not alpha > 0:
            raise ValueError(f"alpha={alpha} is not valid; accepted: > 0")
        self._num_partitions = num_partitions
        self._alpha = float(alpha)
        self._partition_by = partition_by
        self._group_attributes = tuple(group_attributes)
        self._seed = seed
        self._partition_rows: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        """Total number of partitions."""
        return self._num_partitions

    def load_partition(self, partition_id: int) -> Dataset:
        """The rows of partition ``partition_id`` (a ``datasets.Dataset``, as flwr-datasets'
        partitioners return); ValueError unless 0 <= partition_id < num_partitions."""
        if not 0 <= partition_id < self._num_partitions:
            raise ValueError(
                f"partition_id={partition_id} is out of range; accepted: 0..{self._num_partitions - 1}"
            )
        return self.dataset.select(self.partition_rows()[partition_id])

    def partition_rows(self) -> list[np.ndarray]:
        """Row indices of every partition (computed once, then reused)."""
        if self._partition_rows is None:
            self._partition_rows = self._build()
        return self._partition_rows

    def _build(self) -> list[np.ndarray]:
        ids = np.asarray(self.dataset[self._partition_by])
        attrs = np.stack(
            [np.asarray(self.dataset[a], dtype=np.int64) for a in self._group_attributes], axis=1
        ) if self._group_attributes else np.zeros((len(ids), 0), dtype=np.int64)
        uniq, inverse = np.unique(ids, return_inverse=True)
        k = self._num_partitions
        if len(uniq) < k:
            raise ValueError(
                f"num_partitions={k} is more than the {len(uniq)} identities in the split; "
                f"accepted: at most {len(uniq)} clients for a partition by identity"
            )
        counts = np.bincount(inverse, minlength=len(uniq))
        # An identity's group: the majority value of each attribute over its images
        # (Male is constant per celebrity; Young can flip between photos).
        weights = np.array([1 << j for j in range(attrs.shape[1])], dtype=np.int64)
        majority = np.zeros((len(uniq), attrs.shape[1]), dtype=np.int64)
        for j in range(attrs.shape[1]):
            ones = np.bincount(inverse, weights=attrs[:, j], minlength=len(uniq))
            majority[:, j] = (2 * ones >= counts).astype(np.int64)
        group = majority @ weights if attrs.shape[1] else np.zeros(len(uniq), dtype=np.int64)
        num_groups = 1 << attrs.shape[1]

        rng = np.random.default_rng(self._seed)
        mix = rng.dirichlet(np.full(num_groups, self._alpha), size=k)  # (clients, groups)
        owner = np.full(len(uniq), -1, dtype=np.int64)
        for g in range(num_groups):
            members = np.flatnonzero(group == g)
            if len(members) == 0:
                continue
            members = members[rng.permutation(len(members))]
            share = mix[:, g] / mix[:, g].sum()
            target = share * counts[members].sum()
            got = np.zeros(k)
            for ident in members:  # greedy: the client furthest below its target takes it
                c = int(np.argmax(target - got))
                owner[ident] = c
                got[c] += counts[ident]
        fill_empty_partitions(owner, counts, k)
        row_owner = owner[inverse]
        return [np.flatnonzero(row_owner == c) for c in range(k)]


def fill_empty_partitions(owner: np.ndarray, counts: np.ndarray, k: int) -> None:
    """Move identities into empty clients (in place): each empty client takes the identity
    with the fewest images from the client holding the most images (that has >1 identity)."""
    while True:
        sizes = np.bincount(owner, weights=counts, minlength=k)
        empty = np.flatnonzero(sizes == 0)
        if len(empty) == 0:
            return
        idents_per = np.bincount(owner, minlength=k)
        donors = np.flatnonzero(idents_per > 1)
        donor = donors[np.argmax(sizes[donors])]
        candidates = np.flatnonzero(owner == donor)
        ident = candidates[np.argmin(counts[candidates])]
        owner[ident] = empty[0]


def build_partitioner(cfg: RunConfig, num_partitions: int) -> Partitioner:
    """The partitioner for ``cfg.split`` over ``num_partitions`` clients (never hard-coded)."""
    if cfg.split == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if cfg.split == "celebrity":
        return NaturalIdPartitioner(partition_by="celeb_id")  # as many partitions as identities
    return IdentityDirichletPartitioner(
        num_partitions=num_partitions,
        alpha=cfg.noniid_alpha,
        group_attributes=cfg.noniid_attributes,
        seed=cfg.seed,
    )


def local_split(
    partition: Dataset, val_fraction: float, by_identity: bool, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (into ``partition``) of a client's local train and validation parts.

    By identity when ``by_identity`` so no celebrity sits in both parts; the validation part is
    empty when ``val_fraction`` is 0 or the client is too small to spare a row (or identity).
    """
    n = len(partition)
    rng = np.random.default_rng(seed)
    if val_fraction <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    if not by_identity:
        perm = rng.permutation(n)
        n_val = min(max(1, round(val_fraction * n)), n - 1)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    ids = np.asarray(partition["celeb_id"])
    uniq = np.unique(ids)
    if len(uniq) < 2:
        return np.arange(n), np.arange(0)
    uniq = uniq[rng.permutation(len(uniq))]
    val_ids, taken = [], 0
    for ident in uniq[:-1]:  # always leave at least one identity for training
        if taken >= val_fraction * n:
            break
        val_ids.append(ident)
        taken += int((ids == ident).sum())
    is_val = np.isin(ids, val_ids)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
