"""The upsamplers' conditioning corruptions: deterministic under a seed, shape-preserving, and each
one really corrupts the image in the way it claims."""

from __future__ import annotations

import pytest
import torch

from unclip.models.degradations import (
    BSRDegradation,
    GaussianBlurDegradation,
    build_degradation,
    gaussian_kernels,
    jpeg,
)


def checkerboard(batch: int = 4, size: int = 32) -> torch.Tensor:
    """Sharp edges everywhere: blur, resampling and JPEG all visibly change it."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = ((x // 4 + y // 4) % 2).float() * 1.6 - 0.8
    colours = torch.linspace(0.5, 1.0, 3)[:, None, None]
    return (board * colours).expand(batch, 3, size, size).clone()


def high_frequency_energy(images: torch.Tensor) -> float:
    return float(
        (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
        + (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


DEGRADATIONS = [
    pytest.param(GaussianBlurDegradation(probability=1.0), id="gaussian_blur"),
    pytest.param(BSRDegradation(), id="bsr"),
]


@pytest.mark.parametrize("degradation", DEGRADATIONS)
def test_degradation_is_deterministic_under_a_seed_and_changes_the_image(degradation) -> None:
    images = checkerboard()
    first = degradation(images, seeded(0))
    again = degradation(images, seeded(0))
    other = degradation(images, seeded(1))
    assert first.shape == images.shape and first.dtype == images.dtype
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert (first - images).abs().mean() > 0.02
    assert first.min() >= -1 and first.max() <= 1
    assert torch.equal(images, checkerboard()), "the input batch must not be modified"


def test_gaussian_blur_removes_high_frequencies_more_for_larger_sigma() -> None:
    images = checkerboard()
    mild = GaussianBlurDegradation(sigma_range=(0.5, 0.5), probability=1.0)(images, seeded(0))
    strong = GaussianBlurDegradation(sigma_range=(2.0, 2.0), probability=1.0)(images, seeded(0))
    energies = [high_frequency_energy(x) for x in (images, mild, strong)]
    assert energies[0] > energies[1] > energies[2]
    # blur keeps the mean colour (normalised kernels, replicated borders of a periodic image)
    assert torch.allclose(strong.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=0.02)


def test_gaussian_blur_probability_picks_which_images_are_blurred() -> None:
    images = checkerboard(batch=64)
    out = GaussianBlurDegradation(probability=0.5)(images, seeded(0))
    changed = (out - images).flatten(1).abs().amax(dim=1) > 0
    assert 16 < int(changed.sum()) < 48
    never = GaussianBlurDegradation(probability=0.0)(images, seeded(0))
    assert torch.equal(never, images)


def test_gaussian_kernels_are_normalised_and_anisotropic_when_asked() -> None:
    sigma = torch.tensor([1.0, 3.0], dtype=torch.float64)
    small = torch.tensor([1.0, 0.5], dtype=torch.float64)
    kernels = gaussian_kernels(sigma, small, torch.zeros(2, dtype=torch.float64), 11)
    assert torch.allclose(kernels.sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64))
    isotropic, anisotropic = kernels
    assert torch.allclose(isotropic, isotropic.T)
    # wide along x (columns), narrow along y (rows)
    assert anisotropic.sum(dim=0).std() < anisotropic.sum(dim=1).std()


def test_bsr_mixes_its_operations_differently_per_image() -> None:
    images = checkerboard(batch=8)
    out = BSRDegradation()(images, seeded(0))
    per_image = [(out[i] - images[i]).abs().mean().item() for i in range(len(images))]
    assert len({round(v, 4) for v in per_image}) == len(per_image)


def test_bsr_noise_and_jpeg_alone_behave_as_documented() -> None:
    images = torch.zeros(2, 3, 32, 32)
    only_noise = BSRDegradation(
        blur_passes=0,
        resize_probability=0.0,
        noise_probability=1.0,
        noise_level_range=(25.0, 25.0),
        gray_noise_probability=0.0,
        jpeg_probability=0.0,
    )(images, seeded(0))
    assert only_noise.std().item() == pytest.approx(25 / 127.5, rel=0.1)
    low = jpeg(checkerboard(1)[0], quality=10)
    high = jpeg(checkerboard(1)[0], quality=95)
    truth = checkerboard(1)[0]
    assert (low - truth).abs().mean() > (high - truth).abs().mean()


def test_build_degradation_from_config_and_errors_name_the_key() -> None:
    assert build_degradation(None) is None
    assert build_degradation({"kind": "none"}) is None
    blur = build_degradation({"kind": "gaussian_blur", "sigma_range": [0.3, 0.9]})
    assert isinstance(blur, GaussianBlurDegradation) and blur.sigma_range == (0.3, 0.9)
    assert isinstance(build_degradation({"kind": "bsr", "jpeg_probability": 0.5}), BSRDegradation)
    with pytest.raises(ValueError, match=r"model\.degradation\.kind='sharpen'"):
        build_degradation({"kind": "sharpen"})
    with pytest.raises(ValueError, match=r"model\.degradation\.sigma_range"):
        build_degradation({"kind": "gaussian_blur", "sigma_range": [0.9, 0.3]})
    with pytest.raises(ValueError, match=r"model\.degradation\.blur_sigma: unknown key"):
        build_degradation({"kind": "bsr", "blur_sigma": 1.0})
    with pytest.raises(ValueError, match=r"model\.degradation\.blur_passes: expected int"):
        build_degradation({"kind": "bsr", "blur_passes": "two"})
    with pytest.raises(ValueError, match=r"model\.degradation\.jpeg_quality_range"):
        BSRDegradation(jpeg_quality_range=(30, 120))
