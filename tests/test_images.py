"""images.py: batched decoding, resize and crop; broken JPEGs named, not decoded partly."""

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from celeba_app import images


def test_decode_resize_is_square_and_flip_is_a_mirror(part):
    blobs = next(part.encoded_images(4))
    x = images.decode_resize(blobs, 40)
    assert x.shape == (4, 3, 40, 40) and x.dtype == torch.uint8
    assert torch.equal(images.decode_resize(blobs, 40, hflip=True), x.flip(-1))


def test_antialiasing_changes_nothing_when_enlarging():
    """Why the GPU path resizes without antialiasing when enlarging (its CUDA kernel is slow)."""
    x = torch.randint(0, 256, (2, 3, 109, 89), dtype=torch.uint8).float()
    up = [TF.resize(x, [224], antialias=a) for a in (True, False)]
    assert (up[0] - up[1]).abs().max() < 1e-2
    down = [TF.resize(x, [40], antialias=a) for a in (True, False)]
    assert (down[0] - down[1]).abs().max() > 1.0


@pytest.mark.parametrize("size", [224, 16])  # enlarging (as CelebA to 224 px) and shrinking 30 px
def test_gpu_style_float_resize_is_within_one_grey_level_of_the_cpu_path(part, size):
    [(_, batch)] = images.decode(next(part.encoded_images(4)))
    cpu = TF.resize(batch, [size], antialias=True)
    gpu_way = images._resize_float(batch, size)
    assert gpu_way.dtype == torch.uint8 and gpu_way.shape == cpu.shape
    assert (gpu_way.int() - cpu.int()).abs().max() <= 1


def test_images_of_mixed_sizes_keep_their_order():
    from torchvision.io import encode_jpeg, encode_png

    g = torch.Generator().manual_seed(0)
    pictures = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
                for h, w in [(30, 20), (24, 24), (30, 20), (18, 40)]]
    blobs = [encode_png(im).numpy().tobytes() for im in pictures]  # lossless: exact reference
    x = images.decode_resize(blobs, 16)
    one_by_one = torch.cat([images.decode_resize([b], 16) for b in blobs])
    assert torch.equal(x, one_by_one)
    assert [len(idx) for idx, _ in images.decode(blobs)] == [2, 1, 1]
    jpegs = [encode_jpeg(im).numpy().tobytes() for im in pictures]
    assert torch.equal(images.decode_resize(jpegs, 16), torch.cat([images.decode_resize([b], 16) for b in jpegs]))


def test_a_jpeg_cut_short_is_caught_by_the_decoder_not_decoded_partly(part):
    """torchvision's decode_jpeg raises on a truncated JPEG (libjpeg-turbo would otherwise
    fill the missing rows with grey): the image check relies on it."""
    whole = next(part.encoded_images(1))[0]
    cut = whole[:int(len(whole) * 0.6)]
    with pytest.raises(RuntimeError, match="Image is incomplete or truncated"):
        images.decode([whole, cut])
    assert images.undecodable([[whole, whole], [cut, whole, b"not an image"]]) == [
        (2, "Image is incomplete or truncated"), (4, images.undecodable([[b"not an image"]])[0][1])]
    assert images.undecodable([[whole[:-2]]])  # even the end-of-image marker missing
