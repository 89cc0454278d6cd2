"""mobilenet_layers.py: the block table is torchvision's mobilenet_v2, run for real."""

import pytest
import torch

from celeba_app import mobilenet_layers as L


@pytest.mark.parametrize("image_size", [32, 96, 97, 224])
def test_channels_and_map_sizes_are_those_of_torchvision(image_size):
    from torchvision.models import mobilenet_v2

    x = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad():
        for i, block in enumerate(mobilenet_v2().eval().features):
            x = block(x)
            assert x.shape[1:] == (L.CHANNELS[i], L.map_size(i, image_size), L.map_size(i, image_size)), i
    assert L.LAST == i == 18


def test_feature_dim_is_channels_times_pool_squared():
    assert L.feature_dim(18, 1) == 1280 and L.feature_dim(13, 7) == 4704 and L.feature_dim(13, 3) == 864
    assert L.describe(13, 7) == "features[13] pooled 7x7 (4704 numbers)"
