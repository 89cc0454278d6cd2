import numpy as np
import pytest

from celeba_app import data
from celeba_app.config import ConfigError, RunConfig
from celeba_app.data import NodeData, check_identity_disjoint, client_parts, load_federated, server_part
from celeba_app.demo_data import make_celeba
from conftest import recode_column, truncate_image


def cfg_for(path, **kw):
    return RunConfig.from_run_config({"dataset": str(path), **kw})


@pytest.mark.parametrize("split", ["iid", "noniid"])
def test_clients_cover_train_once_and_never_see_valid_or_test(celeba_dir, split):
    cfg = cfg_for(celeba_dir, split=split, **{"noniid-alpha": 0.5})
    n = 6
    ids_train = set()
    for pid in range(n):
        train, val = client_parts(cfg, NodeData.partition(cfg, pid, n))
        assert len(train) > 0
        ids_train |= set(train.celeb_ids) | set(val.celeb_ids)
        if split == "noniid":
            assert not set(train.celeb_ids) & set(val.celeb_ids)
    total = sum(len(p) for pid in range(n) for p in client_parts(cfg, NodeData.partition(cfg, pid, n)))
    assert total == len(load_federated(cfg, n).load_split("train"))
    for s in ("valid", "test"):
        assert not ids_train & set(server_part(cfg, s).celeb_ids)
    assert check_identity_disjoint(cfg, n)["train"] == 60


def test_noniid_clients_hold_whole_identities(celeba_dir):
    cfg = cfg_for(celeba_dir, split="noniid")
    owner = {}
    for pid in range(5):
        for part in client_parts(cfg, NodeData.partition(cfg, pid, 5)):
            for ident in set(part.celeb_ids.tolist()):
                assert owner.setdefault(ident, pid) == pid


def test_identity_leak_between_splits_is_refused(tmp_path):
    import shutil
    root = make_celeba(tmp_path / "leaky", n_train_ids=10, n_eval_ids=3)
    # Make valid a copy of train: every identity leaks.
    shutil.copy(root / "train-00000-of-00001.parquet", root / "valid-00000-of-00001.parquet")
    with pytest.raises(ConfigError, match="identities are in both train and valid"):
        check_identity_disjoint(cfg_for(root), 2)


def test_unreachable_hub_dataset_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError) as info:
        load_federated(RunConfig(dataset="nobody/no-such-celeba"), 3)
    assert "dataset='nobody/no-such-celeba' could not be loaded from the Hugging Face hub" in str(info.value)


def test_row_identity_differs_by_client_and_is_stable(celeba_dir):
    """A row's identity, the key of every per-row cache, is (data_id, split, split row): two
    clients hold different rows, the same client the same rows again, another partitioning
    other rows, and the identity does not depend on the path (data_id is the content's)."""
    cfg = cfg_for(celeba_dir)
    a0, _ = client_parts(cfg, NodeData.partition(cfg, 0, 4))
    a1, _ = client_parts(cfg, NodeData.partition(cfg, 1, 4))
    data.clear_caches()
    again, _ = client_parts(cfg, NodeData.partition(cfg, 0, 4))
    assert (a0.data_id, a0.split) == (a1.data_id, a1.split) == (again.data_id, "train") and a0.data_id
    assert not set(a0.split_rows.tolist()) & set(a1.split_rows.tolist())
    assert again.split_rows.tolist() == a0.split_rows.tolist()
    other_partitioning, _ = client_parts(cfg, NodeData.partition(cfg, 0, 5))
    assert other_partitioning.split_rows.tolist() != a0.split_rows.tolist()


def test_encoded_images_yield_every_image_in_order(celeba_dir):
    part = server_part(cfg_for(celeba_dir), "valid")
    blobs = [b for batch in part.encoded_images(7) for b in batch]
    assert len(blobs) == len(part) and all(b[:2] == b"\xff\xd8" for b in blobs)
    assert np.isin(part.labels, [0, 1]).all()


def minus_one_one(values):
    return np.where(values.astype(bool), 1, -1)


def test_labels_encoded_minus_one_one_are_refused_naming_split_column_and_values(tmp_path):
    root = make_celeba(tmp_path / "pm1", n_train_ids=8, n_eval_ids=3)
    recode_column(root, "test", "Smiling", minus_one_one)  # datasets reads it as train's booleans: all True
    cfg = cfg_for(root)
    with pytest.raises(ConfigError) as info:
        server_part(cfg, "test")
    assert str(info.value) == (f"dataset={str(root)!r} split 'test' column 'Smiling' has values [-1, 1]; "
                               "accepted: booleans or 0/1")


def test_a_dataset_converted_from_list_attr_celeba_is_refused_by_clients_and_server(tmp_path):
    root = make_celeba(tmp_path / "pm1", n_train_ids=8, n_eval_ids=3)
    for split in ("train", "valid", "test"):
        recode_column(root, split, "Smiling", minus_one_one)
    cfg = cfg_for(root)
    with pytest.raises(ConfigError, match=r"split 'train' column 'Smiling' has values \[-1, 1\]; accepted"):
        client_parts(cfg, NodeData.partition(cfg, 0, 2))
    with pytest.raises(ConfigError, match=r"split 'valid' column 'Smiling' has values \[-1, 1\]; accepted"):
        data.server_identities(cfg)  # the server's first look at its data


def test_sensitive_attribute_of_train_not_binary_is_refused_on_every_client(tmp_path):
    root = make_celeba(tmp_path / "pm1", n_train_ids=8, n_eval_ids=3)
    recode_column(root, "train", "Pale_Skin", lambda v: np.where(v, 2.0, 0.0), dtype="float64")
    cfg = cfg_for(root)
    for pid in range(2):
        with pytest.raises(ConfigError, match=r"split 'train' column 'Pale_Skin' has values \[0.0, 2.0\]; "
                                              "accepted: booleans or 0/1"):
            client_parts(cfg, NodeData.partition(cfg, pid, 2))


def test_integer_zero_one_labels_are_accepted(tmp_path):
    root = make_celeba(tmp_path / "int01", n_train_ids=8, n_eval_ids=3)
    recode_column(root, "valid", "Smiling", lambda v: v.astype(np.int64))
    valid = server_part(cfg_for(root), "valid")
    assert set(valid.labels.tolist()) == {0, 1}


def test_noniid_grouping_attributes_are_checked_for_noniid_only(tmp_path):
    root = make_celeba(tmp_path / "young", n_train_ids=8, n_eval_ids=3)
    recode_column(root, "train", "Young", minus_one_one)
    kw = {"sensitive-attributes": "Male", "noniid-attributes": "Male,Young"}
    client_parts(cfg_for(root, **kw), NodeData.partition(cfg_for(root, **kw), 0, 2))  # iid: Young unused
    cfg = cfg_for(root, split="noniid", **kw)
    with pytest.raises(ConfigError, match=r"split 'train' column 'Young' has values \[-1, 1\]; accepted"):
        client_parts(cfg, NodeData.partition(cfg, 0, 2))


@pytest.mark.parametrize("split", ["iid", "noniid"])
def test_more_clients_than_training_rows_is_refused_before_training(tmp_path, split):
    root = make_celeba(tmp_path / "three", n_train_ids=3, n_eval_ids=2, per_id=(1, 1))  # 3 train rows
    cfg = cfg_for(root, split=split)
    for pid in (0, 4):
        with pytest.raises(ConfigError) as info:
            client_parts(cfg, NodeData.partition(cfg, pid, 5))
        assert str(info.value) == (f"num-partitions=5 is more than the 3 rows of dataset={str(root)!r} split "
                                   "'train'; accepted: at most 3 partitions (every client needs at least one row)")
    assert [len(client_parts(cfg, NodeData.partition(cfg, pid, 3))[0]) for pid in range(3)] == [1, 1, 1]


class FlwrWarnings(list):
    """Warnings logged on Flower's logger (which does not propagate to pytest's caplog)."""

    def __enter__(self):
        import logging

        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.append(record.getMessage())
        logging.getLogger("flwr").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("flwr").removeHandler(self.handler)


def celeb_ids_of(root, split):
    import pyarrow.parquet as pq

    return pq.read_table(root / f"{split}-00000-of-00001.parquet", columns=["celeb_id"]).column(0).to_pylist()


def test_undecodable_image_fails_naming_split_row_and_celeb_id_or_is_skipped(tmp_path):
    root = make_celeba(tmp_path / "cut", n_train_ids=8, n_eval_ids=3)
    truncate_image(root, "test", 2)  # a JPEG cut to 60% of its bytes
    ids = celeb_ids_of(root, "test")
    skip = cfg_for(root, **{"bad-images": "skip", "cache-dir": str(tmp_path / "c1")})
    with FlwrWarnings() as warned:
        part = server_part(skip, "test")
    [rec] = part.skipped_rows
    assert rec == {"part": "test", "row": rec["row"], "split_row": 2, "celeb_id": ids[2],
                   "error": "Image is incomplete or truncated"}
    assert any(f"left out test row {rec['row']} (row 2 of split 'test'" in w and f"celeb_id {ids[2]})" in w
               for w in warned)
    # Left out everywhere: arrays, rows and images agree, and every image left decodes.
    assert len(part) == len(ids) - 1 == len(part.rows) == len(part.celeb_ids) == len(part.attributes["Male"])
    assert sorted(part.celeb_ids.tolist()) == sorted(ids[:2] + ids[3:])
    from celeba_app.images import undecodable
    assert undecodable(part.encoded_images(4)) == [] and sum(map(len, part.encoded_images(4))) == len(part)

    data.clear_caches()
    with pytest.raises(ConfigError) as info:  # bad-images = "fail", the default
        server_part(cfg_for(root, **{"cache-dir": str(tmp_path / "c2")}), "test")
    assert str(info.value) == (f"dataset={str(root)!r} split 'test' row {rec['row']} (row 2 of the split, celeb_id "
                               f"{ids[2]}): the image cannot be decoded (Image is incomplete or truncated); "
                               "accepted: decodable images, or bad-images='skip' to leave such rows out")


def test_images_are_checked_once_per_set_of_rows(tmp_path, monkeypatch):
    """A later run (embeddings cached) decodes nothing to build its parts."""
    from celeba_app import images

    root = make_celeba(tmp_path / "cut", n_train_ids=8, n_eval_ids=3)
    truncate_image(root, "valid", 0)
    cfg = cfg_for(root, **{"bad-images": "skip", "cache-dir": str(tmp_path / "cache")})
    first = server_part(cfg, "valid")
    data.clear_caches()
    monkeypatch.setattr(images, "undecodable", lambda batches: pytest.fail("images decoded again"))
    again = server_part(cfg, "valid")
    assert again.skipped_rows == first.skipped_rows and again.split_rows.tolist() == first.split_rows.tolist()
    assert len(again) == len(first)


def test_client_parts_leave_out_or_refuse_an_undecodable_training_image(tmp_path):
    from celeba_app.protocol import describe_record, parse_description

    root = make_celeba(tmp_path / "cut", n_train_ids=8, n_eval_ids=3)
    truncate_image(root, "train", 5)
    n = len(celeb_ids_of(root, "train"))
    cfg = cfg_for(root, **{"bad-images": "skip", "cache-dir": str(tmp_path / "cache")})
    entries = [data.describe_node(cfg, NodeData.partition(cfg, pid, 2, str(tmp_path / "cache"))) for pid in range(2)]
    skipped = [r for e in entries for r in e["skipped_rows"]]
    assert [r["split_row"] for r in skipped] == [5] and skipped[0]["part"].startswith("client-")
    assert sum(e["num_train"] + e["num_val"] for e in entries) == n - 1
    holder = next(e for e in entries if e["skipped_rows"])
    assert parse_description(describe_record(holder))["skipped_rows"] == holder["skipped_rows"]
    # From the parts cache in a new process: the same rows, and the images of exactly those rows.
    data.clear_caches()
    pid = holder["partition_id"]
    cached = client_parts(cfg, NodeData.partition(cfg, pid, 2, str(tmp_path / "cache")))
    assert [r for p in cached for r in p.skipped_rows] == holder["skipped_rows"] and cached[0].rows is None
    assert [sum(map(len, p.encoded_images(4))) for p in cached] == [len(p) for p in cached]

    data.clear_caches()
    fail = cfg_for(root, **{"cache-dir": str(tmp_path / "cache")})
    with pytest.raises(ConfigError, match=rf"split 'train' part '{skipped[0]['part']}' row {skipped[0]['row']} "
                                          rf"\(row 5 of the split, celeb_id {skipped[0]['celeb_id']}\): the image "
                                          "cannot be decoded"):
        client_parts(fail, NodeData.partition(fail, pid, 2))
    client_parts(fail, NodeData.partition(fail, 1 - pid, 2))  # the other client's images are sound


def test_a_part_left_without_rows_is_refused(tmp_path):
    root = make_celeba(tmp_path / "cut", n_train_ids=2, n_eval_ids=1, per_id=(1, 1))
    truncate_image(root, "valid", 0)
    with pytest.raises(ConfigError, match=r"split 'valid': none of its 1 images can be decoded"):
        server_part(cfg_for(root, **{"bad-images": "skip"}), "valid")


def test_a_data_path_nodes_rows_keep_their_index_in_its_split(celeba_dir, tmp_path):
    """A contiguous select of a dataset without a row mapping is a slice whose rows restart at
    0 (datasets 3.1): a data-path node's rows carry a mapping, so every part names the right
    rows of its split (the key of the embedding cache)."""
    import pyarrow.parquet as pq

    from celeba_app.partition_folders import main as celeba_partition

    parts = tmp_path / "parts"
    assert celeba_partition(["--run-config", f"dataset='{celeba_dir}' split='noniid' seed=7",
                             "--num-partitions", "2", "--out", str(parts)]) == 0
    cfg = cfg_for(celeba_dir, **{"cache-dir": str(tmp_path / "cache")})
    node = NodeData.from_node_config({"data-path": str(parts / "partition_1")}, cfg)
    whole = data.local_train_split(cfg, node)
    sub = whole.select(range(3, 8))  # contiguous
    assert data.split_rows(sub).tolist() == [3, 4, 5, 6, 7] and sub.data.num_rows == len(whole)
    train, val = client_parts(cfg, node)
    n = len(whole)
    assert train.split_size == val.split_size == n
    assert sorted(train.split_rows.tolist() + val.split_rows.tolist()) == list(range(n))
    files = sorted((parts / "partition_1").glob("train-*.parquet"))
    images = [img["bytes"] for f in files for img in pq.read_table(f, columns=["image"]).column("image").to_pylist()]
    blobs = [b for batch in train.encoded_images(16) for b in batch]
    assert blobs == [images[r] for r in train.split_rows]


def test_the_parts_cache_is_given_its_loader_and_calls_nothing_else(tmp_path):
    """parts_cache stores a node's parts without their rows; the rows come from the loader the
    caller passes (which part: 0 train, 1 val), only when asked for."""
    import numpy as np

    from celeba_app.data import LabeledRows, parts_cache

    def part(name, n):
        return LabeledRows(name=name, rows=None, labels=np.arange(n) % 2, attributes={"Male": np.ones(n, np.int64)},
                           celeb_ids=np.arange(n), data_id="d", split="train", split_size=10,
                           split_rows=np.arange(n))

    path = tmp_path / "parts" / "k.npz"
    parts_cache.save_parts(path, (part("client-0/train", 3), part("client-0/val", 1)))
    asked = []
    train, val = parts_cache.load_parts(path, ("Male",), load_rows=lambda which: asked.append(which) or f"rows{which}")
    assert asked == [] and train.rows is None and val.name == "client-0/val"
    assert np.array_equal(train.labels, [0, 1, 0]) and np.array_equal(val.attributes["Male"], [1])
    assert train.load_rows() == "rows0" and val.load_rows() == "rows1" and asked == [0, 1]
    path.write_bytes(b"not an npz")
    assert parts_cache.load_parts(path, ("Male",), load_rows=lambda which: None) is None  # rebuilt, never trusted


def test_two_nodes_with_the_same_data_are_refused_whatever_partition_id_they_claim(celeba_dir):
    from celeba_app.data import check_clients_distinct, describe_node

    cfg = cfg_for(celeba_dir, split="iid")
    entries = [{**describe_node(cfg, NodeData.partition(cfg, pid, 3)), "node_id": 10 + pid} for pid in range(3)]
    assert len({e["data_fingerprint"] for e in entries}) == 3
    check_clients_distinct(entries)  # three partitions: three fingerprints
    again = {**describe_node(cfg, NodeData.partition(cfg, 0, 3)), "node_id": 13, "partition_id": 3}
    assert again["data_fingerprint"] == entries[0]["data_fingerprint"]
    with pytest.raises(ConfigError, match=r"SuperNodes 10 \(partition-id=0\) and 13 \(partition-id=3\) hold the same "
                                          r"data \(fingerprint [0-9a-f]{16}\); accepted: each SuperNode with its own"):
        check_clients_distinct(entries + [again])


def test_salted_hashes_compare_within_a_salt_and_hide_the_ids():
    from celeba_app.data import hide_identities, salted_hashes

    a, b = salted_hashes([1, 2, 3], "s1"), salted_hashes([3, 4], "s1")
    assert len(set(a) & set(b)) == 1 and not set(a) & set(salted_hashes([3, 4], "s2"))
    assert all(len(h) == 16 and not h.isdigit() for h in a)
    entry = {"partition_id": 0, "celeb_ids": [1, 2, 3], "skipped_rows": [{"row": 4, "celeb_id": 2}]}
    hidden = hide_identities(entry, "s1")
    assert "celeb_ids" not in hidden and hidden["celeb_id_hashes"] == a
    assert hidden["skipped_rows"] == [{"row": 4}]


def test_a_client_identity_in_test_is_caught_through_the_hashes(celeba_dir):
    from celeba_app.data import check_clients_disjoint, hide_identities, server_identities

    cfg = RunConfig(dataset=str(celeba_dir))
    server_ids = server_identities(cfg)
    leaked = next(iter(server_ids["test"]))
    entries = [hide_identities({"celeb_ids": [10_000, leaked]}, "salt")]
    with pytest.raises(ConfigError, match="1 identities are in both train and test"):
        check_clients_disjoint(cfg, server_ids, entries, "salt")
    counts = check_clients_disjoint(cfg, server_ids, [hide_identities({"celeb_ids": [10_000, 10_001]}, "salt")], "salt")
    assert counts["train"] == 2
