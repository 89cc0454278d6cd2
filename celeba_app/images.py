"""Encoded images to square uint8 batches: batched decoding, resizing and cropping.

``torchvision.io.decode_jpeg`` decodes a list of encoded images at once (libjpeg-turbo on CPU,
nvJPEG on CUDA); each group of same-sized images is then resized (shorter side to
``image_size``, antialiased when shrinking) and centre-cropped, optionally mirrored. The
result, uint8 (N, 3, S, S), is what ``extractor.Extractor`` embeds; ImageNet normalisation is
part of that model (``extractor.ImageNetBackbone``), not of this step. ``undecodable`` names
the rows an image check finds broken (``bad-images``).
"""

from __future__ import annotations

import re
import warnings
from typing import Iterable, Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

def decode(encoded: Sequence[bytes], device: torch.device | str = "cpu") -> list[tuple[list[int], torch.Tensor]]:
    """Encoded images -> uint8 RGB stacked per image size: [(indices, (k, 3, H, W))].

    JPEGs are decoded by libjpeg-turbo on the CPU, or by nvJPEG as one batch on a CUDA
    ``device``, where the GPU is then fed without the CPU's threads (why nvJPEG: the GPU
    section of docs/SPEED.md). Images of different sizes keep their order within each size.
    """
    images = _decode_each(encoded, torch.device(device))
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape[-2:]), []).append(i)
    return [(idx, torch.stack([images[i] for i in idx])) for idx in by_shape.values()]


def _decode_each(encoded: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """Encoded images -> a list of uint8 (3, H, W) RGB tensors on ``device``. Raises
    RuntimeError when one cannot be decoded (a truncated JPEG included: libjpeg-turbo's
    "Image is incomplete or truncated")."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
    with warnings.catch_warnings():
        # torchvision 0.29 flags its decoders for a future move to torchcodec; they still
        # are the fastest batched JPEG decoders that install everywhere.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        if all(len(b) > 2 and b[0] == 0xFF and b[1] == 0xD8 for b in encoded):
            return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        return [decode_image(r, mode=ImageReadMode.RGB).to(device) for r in raw]


def undecodable(batches: Iterable[Sequence[bytes]]) -> list[tuple[int, str]]:
    """(index over all batches, reason) of every encoded image that ``decode`` cannot decode,
    checked with the same decoders on the CPU: a batch at a time, image by image only in a
    batch that fails. About one decode per image (~0.4 ms for a CelebA face on one core)."""
    bad: list[tuple[int, str]] = []
    offset = 0
    for batch in batches:
        try:
            _decode_each(batch, torch.device("cpu"))
        except (RuntimeError, ValueError):
            for i, blob in enumerate(batch):
                try:
                    _decode_each([blob], torch.device("cpu"))
                except (RuntimeError, ValueError) as exc:
                    bad.append((offset + i, _decode_reason(exc)))
        offset += len(batch)
    return bad


def _decode_reason(exc: Exception) -> str:
    """torchvision's error without its source location: 'Image is incomplete or truncated'."""
    text = " ".join(str(exc).split())
    return re.sub(r"^.*?\.cpp:\d+,\s*", "", text)[:200] or type(exc).__name__


def resize_crop(groups: list[tuple[list[int], torch.Tensor]], image_size: int, hflip: bool = False,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Decoded groups -> uint8 (N, 3, S, S) on ``device``: shorter side resized to S
    (antialiased where it matters), centre crop, optional mirror.

    On CUDA the images are resized there (uploaded first if decoded on the CPU).
    """
    from torchvision.transforms.v2 import functional as TF

    device = torch.device(device)
    resized = []
    for _, batch in groups:
        if device.type != "cpu":  # antialiased resize of uint8 is a CPU kernel; use float on GPU
            batch = _resize_float(batch.to(device, non_blocking=True), image_size)
        else:
            batch = TF.resize(batch, [image_size], antialias=True)
        resized.append(TF.center_crop(batch, [image_size, image_size]))
    if len(groups) == 1:  # all images of one size (CelebA): already in order
        out = resized[0]
    else:
        order = torch.tensor([i for idx, _ in groups for i in idx]).argsort()
        out = torch.cat(resized)[order.to(device)]
    return out.flip(-1) if hflip else out


def _resize_float(batch: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 -> uint8 resize of the shorter side through float, the GPU's way. Antialiasing
    only when shrinking: when enlarging (CelebA's 178 px faces to 224) it changes nothing
    (1e-3 in float) but its CUDA kernel is several times slower than plain bilinear."""
    from torchvision.transforms.v2 import functional as TF

    antialias = min(batch.shape[-2:]) > image_size
    out = TF.resize(batch.float(), [image_size], antialias=antialias)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def decode_resize(encoded: Sequence[bytes], image_size: int, hflip: bool = False,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Encoded images -> uint8 (N, 3, S, S) on ``device``: ``decode`` then ``resize_crop``."""
    return resize_crop(decode(encoded, device), image_size, hflip, device)
