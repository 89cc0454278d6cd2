"""extractor.py: the backbone's runtimes agree, normalisation is ImageNet's, batches keep order."""

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from celeba_app import images
from celeba_app.extractor import Extractor, ImageNetBackbone, extract


def embed(backbone, runtime, onnx_dir, part, size=32):
    """float32 (N, backbone.dim) embeddings of ``part`` by an Extractor on ``runtime``, batches of 8."""
    ex = Extractor(backbone, runtime, torch.device("cpu"), size, onnx_dir=onnx_dir, weights_id="w1")
    return extract(ex, part.encoded_images(8)), ex


def test_decoding_ahead_keeps_batch_order(backbone, part):
    ex = Extractor(backbone, "torch", torch.device("cpu"), 32)
    ex.model = lambda x: x.float().flatten(1)[:, :1280]  # an image's own pixels, not a backbone's
    batches = list(part.encoded_images(3))
    assert len(batches) > 3
    pixels = torch.cat([images.decode_resize(b, 32) for b in batches])
    assert torch.equal(extract(ex, iter(batches)), pixels.float().flatten(1)[:, :1280])
    assert torch.equal(extract(ex, iter(batches), hflip=True), pixels.flip(-1).float().flatten(1)[:, :1280])
    assert extract(ex, iter([])).shape == (0, 1280)


def test_normalisation_matches_torchvision(backbone):
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    ref = TF.normalize(x.float() / 255, list(images.IMAGENET_MEAN), list(images.IMAGENET_STD))
    with torch.no_grad():
        assert torch.allclose(ImageNetBackbone(backbone)(x), backbone(ref), atol=1e-5)


def test_onnx_features_match_pytorch(backbone, part, tmp_path):
    pytest.importorskip("onnxruntime")
    t, _ = embed(backbone, "torch", tmp_path / "t", part)
    o, _ = embed(backbone, "onnx", tmp_path / "o", part)
    assert torch.allclose(t, o, atol=1e-4, rtol=1e-4), (t - o).abs().max()


@pytest.mark.parametrize("layer, pool, size", [(13, 4, 96), (6, 3, 64), (10, 7, 96), (18, 1, 32)])
def test_onnx_matches_pytorch_for_any_block_and_pool(weights_file, part, tmp_path, layer, pool, size):
    """4 from a 6x6 map and 3 from 8x8 do not divide: ONNX's own adaptive pooling refuses
    them, model.AdaptiveAvgPool2d does not."""
    pytest.importorskip("onnxruntime")
    from celeba_app.model import Backbone, load_mobilenet

    backbone = Backbone(load_mobilenet(str(weights_file)), layer, pool)
    t, _ = embed(backbone, "torch", tmp_path / "t", part, size=size)
    o, ex = embed(backbone, "onnx", tmp_path / "o", part, size=size)
    assert t.shape == (len(part), backbone.dim) == o.shape and ex.dim == backbone.dim
    assert torch.allclose(t, o, atol=1e-4, rtol=1e-4), (t - o).abs().max()


def test_freed_memory_goes_back_to_the_system_on_glibc_and_nothing_changes_elsewhere(monkeypatch):
    """extractor.return_freed_memory fixes glibc's mmap and trim thresholds (mallopt) so that
    embedding's large freed blocks are returned; without glibc it reports False and does nothing."""
    import ctypes
    import platform

    from celeba_app import extractor

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    extractor.return_freed_memory.cache_clear()
    assert extractor.return_freed_memory() is True
    assert calls == [(-3, 128 * 1024), (-1, 128 * 1024)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    extractor.return_freed_memory.cache_clear()
    assert extractor.return_freed_memory() is False
    monkeypatch.undo()
    extractor.return_freed_memory.cache_clear()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert extractor.return_freed_memory() is True  # the real mallopt accepts both
