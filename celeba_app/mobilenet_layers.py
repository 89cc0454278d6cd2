"""Where the head reads MobileNetV2: the blocks of ``features``, their widths and map sizes.

``feature-layer = i`` means the output of torchvision's ``mobilenet_v2().features[i]``
(i = 0..18; 18 is the last 1x1 convolution, 1,280 channels); ``feature-pool = p`` reduces it
as ``adaptive_avg_pool2d(out, p)`` and flattens it channel-major, so the head reads
``channels(i) * p * p`` numbers per image. Plain numbers, no torch: config.py checks a setting
with them before anything is loaded (tests/test_mobilenet_layers.py holds them equal to the
torchvision module).
"""

from __future__ import annotations

#: Output channels of ``mobilenet_v2().features[i]`` (width multiplier 1.0).
CHANNELS: tuple[int, ...] = (32, 16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320, 1280)
#: Blocks whose first convolution has stride 2 (3x3, padding 1): each halves the map, rounding up.
STRIDE_2: frozenset[int] = frozenset({0, 2, 4, 7, 14})
LAST = len(CHANNELS) - 1


def map_size(layer: int, image_size: int) -> int:
    """Side of ``features[layer]``'s (square) output map for a square input of ``image_size`` px."""
    side = image_size
    for block in range(layer + 1):
        if block in STRIDE_2:
            side = (side + 1) // 2
    return side


def feature_dim(layer: int, pool: int) -> int:
    """Numbers per image the head reads: ``channels(layer) * pool * pool``."""
    return CHANNELS[layer] * pool * pool


def describe(layer: int, pool: int) -> str:
    """A setting in words, for logs and reports: e.g. ``features[13] pooled 7x7 (4704 numbers)``."""
    return f"features[{layer}] pooled {pool}x{pool} ({feature_dim(layer, pool)} numbers)"
