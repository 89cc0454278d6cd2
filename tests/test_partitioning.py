import numpy as np
import pytest
from datasets import Dataset
from flwr_datasets.partitioner import IidPartitioner

from celeba_app.config import RunConfig
from celeba_app.partitioning import IdentityDirichletPartitioner, build_partitioner, local_split


def identities(n_ids=400, seed=0) -> Dataset:
    """Rows with celeb_id and the group attributes, no images: partitioning needs none."""
    rng = np.random.default_rng(seed)
    rows = {"celeb_id": [], "Male": [], "Young": [], "Smiling": []}
    for ident in range(n_ids):
        male, young = bool(rng.random() < 0.4), bool(rng.random() < 0.75)
        for _ in range(int(rng.integers(1, 8))):
            rows["celeb_id"].append(ident + 1000)
            rows["Male"].append(male)
            rows["Young"].append(young if rng.random() < 0.9 else not young)
            rows["Smiling"].append(bool(rng.random() < (0.35 if male else 0.6)))
    return Dataset.from_dict(rows)


def partition(ds, k=20, alpha=0.5, seed=1):
    p = IdentityDirichletPartitioner(num_partitions=k, alpha=alpha, seed=seed)
    p.dataset = ds
    return p


def test_every_row_exactly_once_and_no_identity_on_two_clients():
    ds = identities()
    p = partition(ds)
    rows = np.concatenate(p.partition_rows())
    assert sorted(rows.tolist()) == list(range(len(ds)))
    owner = {}
    for c in range(p.num_partitions):
        for ident in set(p.load_partition(c)["celeb_id"]):
            assert owner.setdefault(ident, c) == c, f"identity {ident} on clients {owner[ident]} and {c}"


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_no_client_empty(alpha):
    p = partition(identities(n_ids=60), k=50, alpha=alpha)
    assert min(len(r) for r in p.partition_rows()) > 0


def test_deterministic_for_a_seed_and_different_across_seeds():
    ds = identities()
    a = [r.tolist() for r in partition(ds, seed=3).partition_rows()]
    b = [r.tolist() for r in partition(ds, seed=3).partition_rows()]
    c = [r.tolist() for r in partition(ds, seed=4).partition_rows()]
    assert a == b
    assert a != c


def male_rate_spread(alpha, seeds=range(3)):
    ds = identities(n_ids=800)
    male = np.asarray(ds["Male"])
    spreads = []
    for s in seeds:
        rows = partition(ds, k=20, alpha=alpha, seed=s).partition_rows()
        spreads.append(np.std([male[r].mean() for r in rows]))
    return float(np.mean(spreads))


def test_skew_grows_as_alpha_falls():
    small, mid, large = male_rate_spread(0.1), male_rate_spread(1.0), male_rate_spread(1000.0)
    assert small > mid > large
    assert small > 0.3  # clients dominated by one group
    assert large < 0.12  # close to a random identity grouping


def test_more_clients_than_identities_is_refused():
    p = partition(identities(n_ids=10), k=11)
    with pytest.raises(ValueError, match="num_partitions=11 is more than the 10 identities"):
        p.load_partition(0)


def test_out_of_range_partition_id():
    with pytest.raises(ValueError, match="partition_id=20 is out of range"):
        partition(identities()).load_partition(20)


def test_build_partitioner_follows_split_and_size():
    assert isinstance(build_partitioner(RunConfig(split="iid"), 7), IidPartitioner)
    p = build_partitioner(RunConfig(split="noniid", noniid_alpha=0.3), 13)
    assert isinstance(p, IdentityDirichletPartitioner) and p.num_partitions == 13


def test_local_split_by_identity_keeps_identities_apart():
    ds = identities(n_ids=30)
    train, val = local_split(ds, 0.2, by_identity=True, seed=0)
    ids = np.asarray(ds["celeb_id"])
    assert len(val) > 0 and len(train) > 0
    assert not set(ids[train]) & set(ids[val])
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(ds)))


def test_local_split_by_row_fraction():
    ds = identities(n_ids=30)
    train, val = local_split(ds, 0.1, by_identity=False, seed=0)
    assert len(val) == round(0.1 * len(ds))
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(ds)))


def test_celebrity_split_is_one_partition_per_identity():
    ds = identities(n_ids=30)
    p = build_partitioner(RunConfig(split="celebrity"), 30)
    p.dataset = ds
    assert p.num_partitions == 30
    seen = []
    for pid in range(30):
        part = p.load_partition(pid)
        assert len(set(part["celeb_id"])) == 1
        seen += part["celeb_id"]
    assert sorted(seen) == sorted(ds["celeb_id"])


def test_celebrity_split_with_another_number_of_clients_is_refused_in_one_line(celeba_dir):
    from celeba_app import data
    from celeba_app.config import ConfigError

    cfg = RunConfig(dataset=str(celeba_dir), split="celebrity")
    with pytest.raises(ConfigError, match=r"split='celebrity' makes one partition per identity: dataset=.* has 60 "
                                          r"identities in train, but num-partitions=3; accepted: num-partitions=60"):
        data.load_federated(cfg, 3)
    node = data.NodeData.partition(cfg, 7, 60)
    train, val = data.client_parts(cfg, node)
    assert len(set(train.celeb_ids) | set(val.celeb_ids)) == 1 and len(train) >= 1
