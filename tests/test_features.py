"""features.py: the embedding cache, each row computed once per cache dir and checked."""

import pytest
import torch

from celeba_app import features as F
from celeba_app import images
from celeba_app.config import RunConfig
from celeba_app.data import NodeData, client_parts, server_part
from celeba_app.extractor import Extractor, ImageNetBackbone
from celeba_app.model import make_head
from celeba_app.task import train_head


def store_for(backbone, cache_dir, runtime="torch", size=32, weights_id="w1"):
    ex = Extractor(backbone, runtime, torch.device("cpu"), size, onnx_dir=cache_dir / "onnx",
                     weights_id=weights_id)
    return F.FeatureStore(ex, weights_id, str(cache_dir), batch_size=8)


def test_cache_reads_what_was_computed_and_misses_on_any_key_change(backbone, part, tmp_path):
    store = store_for(backbone, tmp_path)
    a = store.for_part(part)
    assert store.stats["rows_computed"] == len(part) and store.stats["rows_cached"] == 0
    fresh = store_for(backbone, tmp_path)  # another process's store: reads the disk
    assert torch.equal(fresh.for_part(part), a) and fresh.stats == {
        "rows_cached": len(part), "rows_computed": 0, "extract_seconds": 0.0}
    # Anything that changes an embedding misses: weights, size, view.
    other = store_for(backbone, tmp_path, weights_id="w2")
    other.for_part(part)
    assert other.stats["rows_computed"] == len(part)
    bigger = store_for(backbone, tmp_path, size=48)
    bigger.for_part(part)
    assert bigger.stats["rows_computed"] == len(part)
    both = fresh.for_part(part, hflip=True)
    assert both.shape == (2, len(part), 1280) and fresh.stats["rows_computed"] == len(part)
    assert not torch.equal(both[0], both[1])
    keys = {store.key(part, "orig"), store.key(part, "hflip"), bigger.key(part, "orig"), other.key(part, "orig")}
    assert len({k.digest() for k in keys}) == 4


def test_rows_are_embedded_once_whichever_partitioning_holds_them(backbone, celeba_dir, tmp_path):
    """Two partitionings of one train split (iid and non-IID, different client counts): the
    second computes nothing, and each row's embedding is the same in both."""
    store = store_for(backbone, tmp_path)
    iid = RunConfig(dataset=str(celeba_dir), split="iid")
    first = {}
    for pid in range(3):
        for part in client_parts(iid, NodeData.partition(iid, pid, 3)):
            feats = store.for_part(part)
            first.update({int(r): feats[i] for i, r in enumerate(part.split_rows)})
    computed = store.stats["rows_computed"]
    assert computed == len(first)
    noniid = RunConfig(dataset=str(celeba_dir), split="noniid", seed=3)
    for pid in range(4):
        for part in client_parts(noniid, NodeData.partition(noniid, pid, 4)):
            feats = store.for_part(part)
            assert all(torch.equal(feats[i], first[int(r)]) for i, r in enumerate(part.split_rows))
    assert store.stats["rows_computed"] == computed


def test_a_part_computes_only_the_rows_nobody_computed(healthy_backbone, part, tmp_path):
    backbone = healthy_backbone
    import dataclasses

    store = store_for(backbone, tmp_path)
    half = len(part) // 2
    first = dataclasses.replace(part, rows=part.rows.select(range(half)), labels=part.labels[:half],
                                split_rows=part.split_rows[:half])
    a = store.for_part(first)
    whole = store.for_part(part)
    assert store.stats["rows_computed"] == len(part) and store.stats["rows_cached"] == half
    assert torch.equal(whole[:half], a)
    assert torch.allclose(whole, store_for(backbone, tmp_path / "other").for_part(part), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("damage", ["garbage_rows", "truncate", "meta"])
def test_corrupt_cache_is_detected_and_rebuilt(healthy_backbone, part, tmp_path, damage):
    backbone = healthy_backbone
    import json

    store = store_for(backbone, tmp_path)
    good = store.for_part(part)
    root = store.rows(part, "orig").root
    if damage == "garbage_rows":
        with open(root / "values.f32", "r+b") as f:
            f.seek(int(part.split_rows[0]) * 1280 * 4)
            f.write(b"\x01" * 64)
    elif damage == "truncate":
        with open(root / "values.f32", "r+b") as f:
            f.truncate(100)
    else:
        meta = json.loads((root / "meta.json").read_text())
        (root / "meta.json").write_text(json.dumps({**meta, "view": "hflip"}))  # another store's files
    again = store_for(backbone, tmp_path)
    # equal up to the runtime's batch-to-batch noise: a lone row is a batch of its own
    assert torch.allclose(again.for_part(part), good, rtol=1e-4, atol=1e-4)
    assert again.stats["rows_computed"] == (1 if damage == "garbage_rows" else len(part))
    assert store_for(backbone, tmp_path).for_part(part) is not None
    assert store_for(backbone, tmp_path).stats["rows_computed"] == 0


def test_cache_stores_swapped_on_disk_are_rebuilt_not_trusted(backbone, part, tmp_path):
    """The two views' stores swapped: each holds another key's rows, so neither is trusted."""
    store = store_for(backbone, tmp_path)
    both = store.for_part(part, hflip=True)
    orig, flip = store.rows(part, "orig").root, store.rows(part, "hflip").root
    orig.rename(tmp_path / "x")
    flip.rename(orig)
    (tmp_path / "x").rename(flip)
    again = store_for(backbone, tmp_path)
    assert torch.equal(again.for_part(part, hflip=True), both)
    assert again.stats["rows_computed"] == 2 * len(part) and again.stats["rows_cached"] == 0


def test_a_part_with_rows_left_out_embeds_what_it_holds(backbone, celeba_dir, tmp_path):
    from celeba_app.demo_data import make_celeba
    from conftest import truncate_image

    root = make_celeba(tmp_path / "cut", n_train_ids=4, n_eval_ids=3)
    truncate_image(root, "valid", 1)
    part = server_part(RunConfig(dataset=str(root), bad_images="skip", cache_dir=str(tmp_path / "c")), "valid")
    feats = store_for(backbone, tmp_path).for_part(part)
    assert feats.shape == (len(part), 1280) and len(part.skipped_rows) == 1


def test_another_block_or_pool_is_another_cache_entry_of_its_own_width(weights_file, part, tmp_path):
    from celeba_app.model import Backbone, load_mobilenet

    mobilenet = load_mobilenet(str(weights_file))
    stores = [F.FeatureStore(Extractor(Backbone(mobilenet, layer, pool), "torch", torch.device("cpu"), 64), "w",
                             str(tmp_path), batch_size=8) for layer, pool in ((18, 1), (13, 1), (13, 2))]
    feats = [s.for_part(part) for s in stores]
    assert [f.shape[1] for f in feats] == [1280, 96, 384] == [s.dim for s in stores]
    assert all(s.stats["rows_computed"] == len(part) for s in stores)  # none reused another's rows
    assert len({s.key(part, "orig").digest() for s in stores}) == 3
    again = F.FeatureStore(Extractor(Backbone(mobilenet, 13, 2), "torch", torch.device("cpu"), 64), "w",
                           str(tmp_path), batch_size=8)
    assert torch.equal(again.for_part(part), feats[2]) and again.stats["rows_computed"] == 0


def test_cache_off_recomputes_every_time(backbone, part, tmp_path):
    ex = Extractor(backbone, "torch", torch.device("cpu"), 32)
    store = F.FeatureStore(ex, "w", None, batch_size=8)
    store.for_part(part)
    store.for_part(part)
    assert store.stats["rows_computed"] == 2 * len(part) and not (tmp_path / "features").exists()


def test_the_cache_holds_one_store_per_key_and_nothing_temporary(backbone, part, tmp_path):
    store_for(backbone, tmp_path).for_part(part)
    [root] = [p for p in (tmp_path / "features").iterdir() if p.is_dir()]
    assert sorted(p.name for p in root.iterdir()) == ["crc.u32", "filled.u8", "meta.json", "values.f32"]
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == sorted([root.name, root.name + ".lock"])


def test_training_on_cached_features_equals_training_through_the_backbone(backbone, celeba_dir, tmp_path):
    cfg = RunConfig(dataset=str(celeba_dir))
    train, _ = client_parts(cfg, NodeData.partition(cfg, 0, 2))
    pixels = torch.cat([images.decode_resize(b, 32) for b in train.encoded_images(16)])
    labels = torch.as_tensor(train.labels)
    feats = store_for(backbone, tmp_path).for_part(train)
    kw = dict(epochs=3, lr=0.01, batch_size=8, seed=11)
    cached, through = make_head(1280, seed=1), make_head(1280, seed=1)
    train_head(cached, feats, labels, **kw)
    train_head(through, pixels, labels, encoder=ImageNetBackbone(backbone), **kw)
    for k, v in cached.state_dict().items():
        assert torch.allclose(v, through.state_dict()[k], atol=1e-5), k
    assert not torch.equal(cached.state_dict()["1.weight"], make_head(1280, seed=1).state_dict()["1.weight"])


def test_a_cache_disk_that_cannot_be_written_costs_time_not_the_run(backbone, part, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(F.RowStore, "write", full)
    store = store_for(backbone, tmp_path)
    feats = store.for_part(part)
    assert feats.shape == (len(part), 1280) and store.stats["rows_computed"] == len(part)


def test_a_long_embedding_logs_progress_with_rate_and_eta(caplog):
    import logging

    progress = F.Progress(100, "client-3/train (orig)", every_s=0.0)
    with caplog.at_level(logging.INFO, logger="flwr"):
        progress(40)
        progress(60)  # done: no line
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("celeba-fl: embedding client-3/train (orig): 40/100 images, ")
    assert "img/s, about " in line and line.endswith("s left")
    quiet = F.Progress(100, "x", every_s=3600)
    with caplog.at_level(logging.INFO, logger="flwr"):
        quiet(50)
    assert len(caplog.records) == 1
