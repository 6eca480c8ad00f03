"""Judge the colour of a generated object from its pixels, with no model in the loop.

The shapes dataset draws saturated objects on light, neutral backgrounds that no object colour
resembles. So: estimate the background from the image border, call every pixel far from it
foreground, give each foreground pixel its nearest palette colour, and take the majority.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import torch

RGB = Sequence[float]


def to_uint8_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A [3, H, W] tensor in [-1, 1] (our convention) or an [H, W, 3] uint8 array, as [H, W, 3]
    float RGB in [0, 255]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a [3, H, W] image tensor, got {tuple(image.shape)}")
        array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
        return array.round()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] RGB array, got {array.shape}")
    return array.astype(np.float64)


def border_colour(pixels: np.ndarray, width: int = 1) -> np.ndarray:
    """The median colour of the outermost `width` rows and columns: the background, when objects
    keep clear of the border (the shapes generator keeps a margin)."""
    border = np.concatenate(
        [
            pixels[:width].reshape(-1, 3),
            pixels[-width:].reshape(-1, 3),
            pixels[:, :width].reshape(-1, 3),
            pixels[:, -width:].reshape(-1, 3),
        ]
    )
    return np.median(border, axis=0)


def foreground_mask(pixels: np.ndarray, background: RGB, threshold: float) -> np.ndarray:
    """Pixels whose RGB distance from the background exceeds `threshold`."""
    return np.linalg.norm(pixels - np.asarray(background, dtype=np.float64), axis=-1) > threshold


def nearest_palette(pixels: np.ndarray, palette: Mapping[str, RGB]) -> list[str]:
    """The palette name nearest (Euclidean RGB) to each pixel of an [N, 3] array."""
    names = list(palette)
    colours = np.asarray([palette[n] for n in names], dtype=np.float64)
    distances = np.linalg.norm(pixels[:, None, :] - colours[None, :, :], axis=-1)
    return [names[i] for i in distances.argmin(axis=1)]


def dominant_colour(
    image: torch.Tensor | np.ndarray,
    palette: Mapping[str, RGB],
    *,
    background: RGB | None = None,
    threshold: float = 80.0,
    min_foreground: float = 0.01,
) -> str | None:
    """The palette colour most foreground pixels are nearest to, or None when fewer than
    `min_foreground` of the pixels are foreground (a blank or washed-out image)."""
    pixels = to_uint8_hwc(image)
    background = border_colour(pixels) if background is None else background
    mask = foreground_mask(pixels, background, threshold)
    if mask.mean() < min_foreground or not mask.any():
        return None
    votes = Counter(nearest_palette(pixels[mask], palette))
    return votes.most_common(1)[0][0]
