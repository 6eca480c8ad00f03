"""Judging an object's colour from pixels: exact on synthetic images and on the shapes renders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unclip.data.shapes import BACKGROUNDS, COLOURS, render, scene
from unclip.evaluation.colour import (
    border_colour,
    dominant_colour,
    foreground_mask,
    nearest_palette,
)
from unclip.images import from_pil

PALETTE = {"red": (220, 30, 30), "blue": (30, 70, 220)}


def _canvas(background: tuple[int, int, int] = (250, 250, 250), size: int = 20) -> np.ndarray:
    return np.tile(np.asarray(background, dtype=np.uint8), (size, size, 1))


def test_nearest_palette_and_border_colour() -> None:
    pixels = np.array([[200.0, 60, 40], [0, 0, 255], [128, 50, 120]])
    assert nearest_palette(pixels, PALETTE) == ["red", "blue", "red"]
    image = _canvas((205, 205, 205))
    image[8:12, 8:12] = (220, 30, 30)
    np.testing.assert_array_equal(border_colour(image.astype(float)), [205, 205, 205])


def test_foreground_is_what_is_far_from_the_background() -> None:
    image = _canvas().astype(float)
    image[0, 0] = (240, 240, 240)  # 17 away: background noise
    image[1, 1] = (150, 150, 150)  # 173 away: foreground
    mask = foreground_mask(image, (250, 250, 250), threshold=80)
    assert mask.sum() == 1 and mask[1, 1]


def test_majority_of_foreground_pixels_decides() -> None:
    image = _canvas()
    image[2:10, 2:10] = PALETTE["red"]  # 64 red pixels
    image[12:15, 12:15] = PALETTE["blue"]  # 9 blue pixels
    image[16:18, 2:18] = (245, 245, 240)  # near-background smudge: not foreground
    assert dominant_colour(image, PALETTE) == "red"
    image[11:19, 11:19] = PALETTE["blue"]  # 64 blue pixels
    image[2:10, 2:3] = (250, 250, 250)  # 56 red pixels
    assert dominant_colour(image, PALETTE) == "blue"


def test_blank_or_tiny_foreground_gives_no_colour() -> None:
    image = _canvas()
    assert dominant_colour(image, PALETTE) is None
    image[5, 5] = PALETTE["red"]  # 1 of 400 pixels < 1%
    assert dominant_colour(image, PALETTE) is None
    assert dominant_colour(image, PALETTE, min_foreground=0.001) == "red"


def test_tensor_images_in_minus_one_one_are_judged_like_arrays() -> None:
    image = _canvas()
    image[4:12, 4:12] = PALETTE["blue"]
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    assert dominant_colour(tensor, PALETTE) == "blue"
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        dominant_colour(tensor[0], PALETTE)


@pytest.mark.parametrize("size", [32, 64])
def test_every_single_object_render_of_the_shapes_dataset_is_judged_right(size: int) -> None:
    judged = 0
    for index in range(300):
        record = scene("train", index, seed=3, pair_fraction=0.0)
        obj = record["objects"][0]
        image = from_pil(render(record, size))
        assert dominant_colour(image, COLOURS) == obj["colour"], (index, obj)
        # the border estimate finds the background the generator drew
        pixels = (image.permute(1, 2, 0).numpy() + 1) * 127.5
        assert np.abs(border_colour(pixels) - record["background_rgb"]).max() <= 1
        judged += 1
    assert judged == 300 and len(BACKGROUNDS) == 3
