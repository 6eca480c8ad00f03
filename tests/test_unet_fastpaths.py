"""Inference shortcuts in the UNet give the tensors the plain kernels give."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unclip.nn.unet import upsample_nearest_2x


@pytest.mark.parametrize("shape", [(2, 8, 4, 4), (1, 3, 5, 7), (3, 16, 1, 9)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_nearest_upsampling_equals_interpolate(shape, channels_last) -> None:
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = F.interpolate(x, scale_factor=2, mode="nearest")
    got = upsample_nearest_2x(x)
    assert torch.equal(got, expected)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_nearest_upsampling_passes_gradients_like_interpolate() -> None:
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    (upsample_nearest_2x(x) * torch.arange(288.0).view(2, 4, 6, 6).sin()).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    (
        F.interpolate(x, scale_factor=2, mode="nearest")
        * torch.arange(288.0).view(2, 4, 6, 6).sin()
    ).sum().backward()
    assert torch.allclose(ours, x.grad)
