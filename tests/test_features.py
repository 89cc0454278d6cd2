import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from celeba_app import features as F
from celeba_app.config import RunConfig
from celeba_app.data import NodeData, client_parts, server_part
from celeba_app.model import Backbone, load_mobilenet, make_head
from celeba_app.task import train_head


@pytest.fixture
def backbone(weights_file):
    return Backbone(load_mobilenet(str(weights_file)))


@pytest.fixture
def healthy_backbone(backbone):
    """The randomly initialised backbone with batch-norm statistics measured on noise: its
    activations then keep their scale through depth (the untouched random model's vanish to
    ~1e-10, which says nothing about quantization)."""
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    backbone.features.train()  # Backbone.train() refuses by design
    with torch.no_grad():
        for seed in range(4):
            backbone(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
    return backbone.eval()


@pytest.fixture
def part(celeba_dir):
    return server_part(RunConfig(dataset=str(celeba_dir)), "valid")


def store_for(backbone, cache_dir, runtime="torch", size=32, weights_id="w1"):
    ex = F.Extractor(backbone, runtime, torch.device("cpu"), size, onnx_dir=cache_dir / "onnx",
                     weights_id=weights_id)
    return F.FeatureStore(ex, weights_id, str(cache_dir), batch_size=8)


def test_decode_resize_is_square_and_flip_is_a_mirror(part):
    blobs = next(part.blobs(4))
    x = F.decode_resize(blobs, 40)
    assert x.shape == (4, 3, 40, 40) and x.dtype == torch.uint8
    assert torch.equal(F.decode_resize(blobs, 40, hflip=True), x.flip(-1))


def test_antialiasing_changes_nothing_when_enlarging():
    """Why the GPU path resizes without antialiasing when enlarging (its CUDA kernel is slow)."""
    x = torch.randint(0, 256, (2, 3, 109, 89), dtype=torch.uint8).float()
    up = [TF.resize(x, [224], antialias=a) for a in (True, False)]
    assert (up[0] - up[1]).abs().max() < 1e-2
    down = [TF.resize(x, [40], antialias=a) for a in (True, False)]
    assert (down[0] - down[1]).abs().max() > 1.0


@pytest.mark.parametrize("size", [224, 16])  # enlarging (as CelebA to 224 px) and shrinking 30 px
def test_gpu_style_float_resize_is_within_one_grey_level_of_the_cpu_path(part, size):
    [(_, batch)] = F.decode(next(part.blobs(4)))
    cpu = TF.resize(batch, [size], antialias=True)
    gpu_way = F._resize_float(batch, size)
    assert gpu_way.dtype == torch.uint8 and gpu_way.shape == cpu.shape
    assert (gpu_way.int() - cpu.int()).abs().max() <= 1


def test_images_of_mixed_sizes_keep_their_order():
    from torchvision.io import encode_jpeg, encode_png

    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
              for h, w in [(30, 20), (24, 24), (30, 20), (18, 40)]]
    blobs = [encode_png(im).numpy().tobytes() for im in images]  # lossless: exact reference
    x = F.decode_resize(blobs, 16)
    one_by_one = torch.cat([F.decode_resize([b], 16) for b in blobs])
    assert torch.equal(x, one_by_one)
    assert [len(idx) for idx, _ in F.decode(blobs)] == [2, 1, 1]
    jpegs = [encode_jpeg(im).numpy().tobytes() for im in images]
    assert torch.equal(F.decode_resize(jpegs, 16), torch.cat([F.decode_resize([b], 16) for b in jpegs]))


def test_decoding_ahead_keeps_batch_order(backbone, part):
    ex = F.Extractor(backbone, "torch", torch.device("cpu"), 32)
    ex.model = lambda x: x.float().flatten(1)[:, :1280]  # an image's own pixels, not a backbone's
    batches = list(part.blobs(3))
    assert len(batches) > 3
    images = torch.cat([F.decode_resize(b, 32) for b in batches])
    assert torch.equal(F.extract(ex, iter(batches)), images.float().flatten(1)[:, :1280])
    assert torch.equal(F.extract(ex, iter(batches), hflip=True), images.flip(-1).float().flatten(1)[:, :1280])
    assert F.extract(ex, iter([])).shape == (0, 1280)


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


def test_a_jpeg_cut_short_is_caught_by_the_decoder_not_decoded_partly(part):
    """torchvision's decode_jpeg raises on a truncated JPEG (libjpeg-turbo would otherwise
    fill the missing rows with grey): the image check relies on it."""
    whole = next(part.blobs(1))[0]
    cut = whole[:int(len(whole) * 0.6)]
    with pytest.raises(RuntimeError, match="Image is incomplete or truncated"):
        F.decode([whole, cut])
    assert F.undecodable([[whole, whole], [cut, whole, b"not an image"]]) == [
        (2, "Image is incomplete or truncated"), (4, F.undecodable([[b"not an image"]])[0][1])]
    assert F.undecodable([[whole[:-2]]])  # even the end-of-image marker missing


def test_a_part_with_rows_left_out_embeds_what_it_holds(backbone, celeba_dir, tmp_path):
    from conftest import make_celeba, truncate_image

    root = make_celeba(tmp_path / "cut", n_train_ids=4, n_eval_ids=3)
    truncate_image(root, "valid", 1)
    part = server_part(RunConfig(dataset=str(root), bad_images="skip", cache_dir=str(tmp_path / "c")), "valid")
    feats = store_for(backbone, tmp_path).for_part(part)
    assert feats.shape == (len(part), 1280) and len(part.skipped_rows) == 1


def test_cache_off_recomputes_every_time(backbone, part, tmp_path):
    ex = F.Extractor(backbone, "torch", torch.device("cpu"), 32)
    store = F.FeatureStore(ex, "w", None, batch_size=8)
    store.for_part(part)
    store.for_part(part)
    assert store.stats["rows_computed"] == 2 * len(part) and not (tmp_path / "features").exists()


def test_the_cache_holds_one_store_per_key_and_nothing_temporary(backbone, part, tmp_path):
    store_for(backbone, tmp_path).for_part(part)
    [root] = [p for p in (tmp_path / "features").iterdir() if p.is_dir()]
    assert sorted(p.name for p in root.iterdir()) == ["crc.u32", "filled.u8", "meta.json", "values.f32"]
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == sorted([root.name, root.name + ".lock"])


def test_normalisation_matches_torchvision(backbone):
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    ref = TF.normalize(x.float() / 255, list(F.IMAGENET_MEAN), list(F.IMAGENET_STD))
    with torch.no_grad():
        assert torch.allclose(F.Normalized(backbone)(x), backbone(ref), atol=1e-5)


def test_onnx_features_match_pytorch(backbone, part, tmp_path):
    pytest.importorskip("onnxruntime")
    t = store_for(backbone, tmp_path / "t", runtime="torch").for_part(part)
    o = store_for(backbone, tmp_path / "o", runtime="onnx").for_part(part)
    assert torch.allclose(t, o, atol=1e-4, rtol=1e-4), (t - o).abs().max()


def test_training_on_cached_features_equals_training_through_the_backbone(backbone, celeba_dir, tmp_path):
    cfg = RunConfig(dataset=str(celeba_dir))
    train, _ = client_parts(cfg, NodeData.partition(cfg, 0, 2))
    images = torch.cat([F.decode_resize(b, 32) for b in train.blobs(16)])
    labels = torch.as_tensor(train.labels)
    feats = store_for(backbone, tmp_path).for_part(train)
    kw = dict(epochs=3, lr=0.01, batch_size=8, seed=11)
    cached, through = make_head(seed=1), make_head(seed=1)
    train_head(cached, feats, labels, **kw)
    train_head(through, images, labels, encoder=F.Normalized(backbone), **kw)
    for k, v in cached.state_dict().items():
        assert torch.allclose(v, through.state_dict()[k], atol=1e-5), k
    assert not torch.equal(cached.state_dict()["1.weight"], make_head(seed=1).state_dict()["1.weight"])


def test_int8_runtime_approximates_fp32_with_one_model_per_machine(healthy_backbone, part, tmp_path):
    """``onnx-int8``: an approximation (quantized, not equal) close to fp32, built
    deterministically (every client and the server must embed with the same model)."""
    pytest.importorskip("onnxruntime")
    o_store = store_for(healthy_backbone, tmp_path / "o", runtime="onnx")
    o = o_store.for_part(part)
    q_store = store_for(healthy_backbone, tmp_path / "q", runtime="onnx-int8")
    q = q_store.for_part(part)
    assert q.shape == o.shape and not torch.equal(q, o)
    # This toy model at 32 px: mean cosine 0.73; 0.57 when u8s8 kernels saturate (without
    # reduce_range, on CPUs without VNNI). The real model at 224 px: 0.91 (docs/SPEED.md).
    assert torch.nn.functional.cosine_similarity(q, o).mean() > 0.65
    [m1] = (tmp_path / "q" / "onnx").glob("*-int8-*.onnx")
    store_for(healthy_backbone, tmp_path / "q2", runtime="onnx-int8")
    [m2] = (tmp_path / "q2" / "onnx").glob("*-int8-*.onnx")
    assert m1.read_bytes() == m2.read_bytes()
    assert q_store.extractor.runtime_id == "onnx-cpu-int8-r1" != o_store.extractor.runtime_id


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
