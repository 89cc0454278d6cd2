import numpy as np
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


def test_cache_hits_in_memory_and_on_disk_and_misses_on_any_key_change(backbone, part, tmp_path):
    F.clear_memory_cache()
    store = store_for(backbone, tmp_path)
    a = store.for_part(part)
    assert store.stats["computed"] == 1
    assert torch.equal(store.for_part(part), a) and store.stats["memory_hits"] == 1
    F.clear_memory_cache()
    assert torch.equal(store.for_part(part), a) and store.stats["disk_hits"] == 1
    # Anything that changes an embedding misses: other rows, weights, size, view.
    other = store_for(backbone, tmp_path, weights_id="w2")
    other.for_part(part)
    assert other.stats["computed"] == 1
    bigger = store_for(backbone, tmp_path, size=48)
    bigger.for_part(part)
    assert bigger.stats["computed"] == 1
    both = store.for_part(part, hflip=True)
    assert both.shape == (2, len(part), 1280) and store.stats["computed"] == 2
    assert not torch.equal(both[0], both[1])
    keys = {store.key(part.rows_id, "orig").digest(), store.key("other-rows", "orig").digest(),
            store.key(part.rows_id, "hflip").digest(), bigger.key(part.rows_id, "orig").digest()}
    assert len(keys) == 4


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_checksum"])
def test_corrupt_cache_file_is_detected_and_rebuilt(backbone, part, tmp_path, damage):
    F.clear_memory_cache()
    store = store_for(backbone, tmp_path)
    good = store.for_part(part)
    [path] = list((tmp_path / "features").rglob("*.pt"))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not a tensor file")
    else:
        blob = torch.load(path, weights_only=True)
        blob["features"][0, 0] += 1.0
        torch.save(blob, path)
    F.clear_memory_cache()
    again = store.for_part(part)
    assert store.stats["computed"] == 2 and torch.equal(again, good)
    assert F.load_cached(path, len(part)) is not None  # rewritten whole


def test_cache_files_swapped_on_disk_are_rebuilt_not_trusted(backbone, part, tmp_path):
    """Two files of one row count (the two views of a part), swapped: each is refused because
    the key saved in it is not the key it is loaded for, and recomputed."""
    F.clear_memory_cache()
    store = store_for(backbone, tmp_path)
    both = store.for_part(part, hflip=True)
    assert store.stats["computed"] == 2
    paths = {v: store.cache_dir / d[:2] / f"{d}.pt" for v in F.VIEWS for d in [store.key(part.rows_id, v).digest()]}
    orig, flip = paths["orig"].read_bytes(), paths["hflip"].read_bytes()
    paths["orig"].write_bytes(flip)
    paths["hflip"].write_bytes(orig)
    assert F.load_cached(paths["orig"], len(part)) is not None  # sound file, wrong place
    assert F.load_cached(paths["orig"], len(part), store.key(part.rows_id, "orig")) is None
    F.clear_memory_cache()
    again = store.for_part(part, hflip=True)
    assert store.stats["computed"] == 4 and store.stats["disk_hits"] == 0
    assert torch.equal(again, both)


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
    F.clear_memory_cache()
    feats = store_for(backbone, tmp_path).for_part(part)
    assert feats.shape == (len(part), 1280) and len(part.skipped_rows) == 1


def test_cache_off_recomputes_every_time(backbone, part, tmp_path):
    ex = F.Extractor(backbone, "torch", torch.device("cpu"), 32)
    store = F.FeatureStore(ex, "w", None, batch_size=8)
    store.for_part(part)
    store.for_part(part)
    assert store.stats["computed"] == 2 and not (tmp_path / "features").exists()


def test_write_then_rename_leaves_no_temporary_files(backbone, part, tmp_path):
    F.clear_memory_cache()
    store_for(backbone, tmp_path).for_part(part)
    files = [p.name for p in (tmp_path / "features").rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].endswith(".pt")


def test_normalisation_matches_torchvision(backbone):
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    ref = TF.normalize(x.float() / 255, list(F.IMAGENET_MEAN), list(F.IMAGENET_STD))
    with torch.no_grad():
        assert torch.allclose(F.Normalized(backbone)(x), backbone(ref), atol=1e-5)


def test_onnx_features_match_pytorch(backbone, part, tmp_path):
    pytest.importorskip("onnxruntime")
    F.clear_memory_cache()
    t = store_for(backbone, tmp_path / "t", runtime="torch").for_part(part)
    o = store_for(backbone, tmp_path / "o", runtime="onnx").for_part(part)
    assert torch.allclose(t, o, atol=1e-4, rtol=1e-4), (t - o).abs().max()


def test_training_on_cached_features_equals_training_through_the_backbone(backbone, celeba_dir, tmp_path):
    cfg = RunConfig(dataset=str(celeba_dir))
    train, _ = client_parts(cfg, NodeData.partition(cfg, 0, 2))
    images = torch.cat([F.decode_resize(b, 32) for b in train.blobs(16)])
    labels = torch.as_tensor(train.labels)
    F.clear_memory_cache()
    feats = store_for(backbone, tmp_path).for_part(train)
    kw = dict(epochs=3, lr=0.01, batch_size=8, seed=11)
    cached, through = make_head(seed=1), make_head(seed=1)
    train_head(cached, feats, labels, **kw)
    train_head(through, images, labels, encoder=F.Normalized(backbone), **kw)
    for k, v in cached.state_dict().items():
        assert torch.allclose(v, through.state_dict()[k], atol=1e-5), k
    assert not torch.equal(cached.state_dict()["1.weight"], make_head(seed=1).state_dict()["1.weight"])


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


def test_int8_runtime_approximates_fp32_with_one_model_per_machine(healthy_backbone, part, tmp_path):
    """``onnx-int8``: an approximation (quantized, not equal) close to fp32, built
    deterministically (every client and the server must embed with the same model)."""
    pytest.importorskip("onnxruntime")
    F.clear_memory_cache()
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

    monkeypatch.setattr(F, "save_cached", full)
    F.clear_memory_cache()
    store = store_for(backbone, tmp_path)
    feats = store.for_part(part)
    assert feats.shape == (len(part), 1280) and store.stats["computed"] == 1
