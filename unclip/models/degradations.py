"""Corruptions of an upsampler's low-resolution conditioning image during training.

The paper trains its first upsampler (64->256) on Gaussian-blurred conditioning images and its second
(256->1024) on "BSR degradation" (Zhang et al. 2021, as used by latent diffusion): blurs, a down- and
up-sampling round trip, Gaussian noise and JPEG compression in a random order. Either way the
upsampler learns to be robust to the artefacts of the stage that feeds it at sampling time.

A degradation maps a batch [B, 3, H, W] in [-1, 1] to a corrupted batch of the same shape. Every random
choice is drawn from the `generator` argument (the global RNG when it is None), so a seed fixes the
output. The paper gives no parameter values; the defaults follow DALLE2-pytorch (blur) and BSRGAN
(the rest), scaled to pixels of the low-resolution image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

from unclip.training.config_check import ConfigError, build_config

WHERE = "model.degradation"
RESIZE_MODES = ("nearest", "bilinear", "bicubic", "area")


# ---- random draws ---------------------------------------------------------------------------------
def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def uniform(
    generator: torch.Generator | None, low: float, high: float, size: int = 1
) -> torch.Tensor:
    """`size` floats uniform in [low, high], on the CPU."""
    draw = torch.rand(size, generator=generator, device=_draw_device(generator)).cpu()
    return low + (high - low) * draw.double()


def chance(generator: torch.Generator | None, probability: float) -> bool:
    return bool(uniform(generator, 0.0, 1.0).item() < probability)


def choice(generator: torch.Generator | None, options: Sequence) -> object:
    index = int(
        torch.randint(len(options), (1,), generator=generator, device=_draw_device(generator))
    )
    return options[index]


def permutation(generator: torch.Generator | None, n: int) -> list[int]:
    return torch.randperm(n, generator=generator, device=_draw_device(generator)).tolist()


# ---- the operations -------------------------------------------------------------------------------
def gaussian_kernels(
    sigma_x: torch.Tensor, sigma_y: torch.Tensor, angle: torch.Tensor, size: int
) -> torch.Tensor:
    """[N, size, size] normalised Gaussian kernels, each with its own axis sigmas and rotation."""
    half = (size - 1) / 2
    coords = torch.arange(size, dtype=torch.float64) - half
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    u = cos * x + sin * y  # coordinates along the kernel's rotated axes
    v = -sin * x + cos * y
    exponent = (u / sigma_x[:, None, None]) ** 2 + (v / sigma_y[:, None, None]) ** 2
    kernels = torch.exp(-0.5 * exponent)
    return kernels / kernels.sum(dim=(1, 2), keepdim=True)


def blur(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image of [B, C, H, W] with its own kernel [B, k, k] (edge pixels replicated)."""
    b, c, h, w = images.shape
    k = kernels.shape[-1]
    weight = kernels.to(images).repeat_interleave(c, dim=0)[:, None]  # [B*C, 1, k, k]
    padded = F.pad(images.reshape(1, b * c, h, w), (k // 2,) * 4, mode="replicate")
    return F.conv2d(padded, weight, groups=b * c).reshape(b, c, h, w)


def resize_round_trip(
    image: torch.Tensor, scale: float, down_mode: str, up_mode: str
) -> torch.Tensor:
    """Down-sample [B, C, H, W] by `scale` (< 1) with one kernel and back up with another."""
    h, w = image.shape[-2:]
    small = (max(1, round(h * scale)), max(1, round(w * scale)))
    down = F.interpolate(image, size=small, **_mode_args(down_mode))
    return F.interpolate(down, size=(h, w), **_mode_args(up_mode))


def _mode_args(mode: str) -> dict:
    if mode in ("bilinear", "bicubic"):
        return {"mode": mode, "align_corners": False, "antialias": True}
    return {"mode": mode}


def jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG-compress one [3, H, W] image in [-1, 1] at `quality` (1-100) and decode it again."""
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    decoded = decode_jpeg(encode_jpeg(pixels, quality=int(quality)))
    return decoded.to(image.device, image.dtype) / 127.5 - 1


# ---- argument checks ------------------------------------------------------------------------------
def _check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(
            f"{WHERE}.{name} must be [min, max] with {low} <= min <= max <= {high}, got {value}"
        )
    return float(value[0]), float(value[1])


def _check_probability(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{WHERE}.{name} must be a probability in [0, 1], got {value}")
    return float(value)


def _kernel_size(kernel_size: int | None, sigma_max: float) -> int:
    """An odd kernel size: the given one, or one that covers three sigmas either side."""
    if kernel_size is None:
        return 2 * math.ceil(3 * sigma_max) + 1
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{WHERE}.kernel_size must be a positive odd number, got {kernel_size}")
    return int(kernel_size)


# ---- the degradations -----------------------------------------------------------------------------
@dataclass
class GaussianBlurConfig:
    """`model.degradation` with kind gaussian_blur. DALLE2-pytorch's defaults: sigma in [0.4, 0.6]
    low-resolution pixels, half the images blurred."""

    sigma_range: tuple[float, float] = (0.4, 0.6)
    probability: float = 0.5
    kernel_size: int | None = None


@dataclass
class BSRConfig:
    """`model.degradation` with kind bsr (BSRGAN's values, in low-resolution pixels)."""

    blur_passes: int = 2
    blur_probability: float = 0.5
    blur_sigma_range: tuple[float, float] = (0.2, 2.0)
    anisotropic_probability: float = 0.5
    kernel_size: int | None = None
    resize_probability: float = 0.5
    resize_scale_range: tuple[float, float] = (0.5, 1.0)
    resize_modes: tuple[str, ...] = ("bilinear", "bicubic", "area")
    noise_probability: float = 0.5
    noise_level_range: tuple[float, float] = (2.0, 25.0)
    gray_noise_probability: float = 0.4
    jpeg_probability: float = 0.9
    jpeg_quality_range: tuple[int, int] = (30, 95)
    shuffle: bool = True


class GaussianBlurDegradation:
    """Isotropic Gaussian blur with a random sigma per image (the 64->256 upsampler's corruption)."""

    config_class = GaussianBlurConfig

    def __init__(self, config: GaussianBlurConfig | None = None, /, **settings: Any) -> None:
        config = config if config is not None else GaussianBlurConfig(**settings)
        sigma_range, probability = config.sigma_range, config.probability
        kernel_size = config.kernel_size
        self.sigma_range = _check_range("sigma_range", sigma_range, 1e-3, 100.0)
        self.probability = _check_probability("probability", probability)
        self.kernel_size = _kernel_size(kernel_size, self.sigma_range[1])

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        _check_images(images)
        b = images.shape[0]
        sigma = uniform(generator, *self.sigma_range, size=b)
        chosen = uniform(generator, 0.0, 1.0, size=b) < self.probability
        kernels = gaussian_kernels(
            sigma, sigma, torch.zeros(b, dtype=torch.float64), self.kernel_size
        )
        blurred = blur(images, kernels)
        return torch.where(chosen.to(images.device)[:, None, None, None], blurred, images)

    def __repr__(self) -> str:
        return (
            f"GaussianBlurDegradation(sigma_range={self.sigma_range}, "
            f"probability={self.probability}, kernel_size={self.kernel_size})"
        )


class BSRDegradation:
    """A random mix of blurs, a resampling round trip, Gaussian noise and JPEG, in a random order
    per image (the 256->1024 upsampler's corruption; BSRGAN's recipe, minus its camera-sensor noise).

    Each of the `blur_passes` blurs is isotropic or (with `anisotropic_probability`) anisotropic and
    rotated; the round trip shrinks by a factor in `resize_scale_range` and grows back with kernels
    drawn from `resize_modes`; noise levels are 8-bit pixel levels (BSRGAN: 2 to 25), grey (one value
    for all channels) with `gray_noise_probability`; JPEG quality is drawn from `jpeg_quality_range`.
    """

    config_class = BSRConfig

    def __init__(self, config: BSRConfig | None = None, /, **settings: Any) -> None:
        config = config if config is not None else BSRConfig(**settings)
        blur_passes, blur_probability = config.blur_passes, config.blur_probability
        blur_sigma_range, kernel_size = config.blur_sigma_range, config.kernel_size
        anisotropic_probability = config.anisotropic_probability
        resize_probability, resize_scale_range = (
            config.resize_probability,
            config.resize_scale_range,
        )
        resize_modes, noise_probability = config.resize_modes, config.noise_probability
        noise_level_range = config.noise_level_range
        gray_noise_probability = config.gray_noise_probability
        jpeg_probability, jpeg_quality_range = config.jpeg_probability, config.jpeg_quality_range
        shuffle = config.shuffle
        if blur_passes < 0:
            raise ValueError(f"{WHERE}.blur_passes must not be negative, got {blur_passes}")
        unknown = [m for m in resize_modes if m not in RESIZE_MODES]
        if not resize_modes or unknown:
            raise ValueError(f"{WHERE}.resize_modes must be a non-empty subset of {RESIZE_MODES}")
        self.blur_passes = int(blur_passes)
        self.blur_probability = _check_probability("blur_probability", blur_probability)
        self.blur_sigma_range = _check_range("blur_sigma_range", blur_sigma_range, 1e-3, 100.0)
        self.anisotropic_probability = _check_probability(
            "anisotropic_probability", anisotropic_probability
        )
        self.kernel_size = _kernel_size(kernel_size, self.blur_sigma_range[1])
        self.resize_probability = _check_probability("resize_probability", resize_probability)
        self.resize_scale_range = _check_range("resize_scale_range", resize_scale_range, 1e-3, 1.0)
        self.resize_modes = tuple(resize_modes)
        self.noise_probability = _check_probability("noise_probability", noise_probability)
        self.noise_level_range = _check_range("noise_level_range", noise_level_range, 0.0, 255.0)
        self.gray_noise_probability = _check_probability(
            "gray_noise_probability", gray_noise_probability
        )
        self.jpeg_probability = _check_probability("jpeg_probability", jpeg_probability)
        self.jpeg_quality_range = _check_range("jpeg_quality_range", jpeg_quality_range, 1, 100)
        self.shuffle = bool(shuffle)

    def operations(self) -> list[str]:
        return ["blur"] * self.blur_passes + ["resize", "noise", "jpeg"]

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        _check_images(images)
        return torch.stack([self.degrade_one(image[None], generator)[0] for image in images])

    def degrade_one(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Corrupt one image [1, 3, H, W]; its operations run in a random order."""
        ops = self.operations()
        order = permutation(generator, len(ops)) if self.shuffle else range(len(ops))
        for index in order:
            image = getattr(self, f"_{ops[index]}")(image, generator)
        return image.clamp(-1, 1)

    def _blur(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not chance(generator, self.blur_probability):
            return image
        if chance(generator, self.anisotropic_probability):
            sigma_x, sigma_y = uniform(generator, *self.blur_sigma_range, size=2)
            angle = uniform(generator, 0.0, math.pi)
        else:
            sigma_x = sigma_y = uniform(generator, *self.blur_sigma_range)[0]
            angle = torch.zeros(1, dtype=torch.float64)
        kernel = gaussian_kernels(sigma_x.view(1), sigma_y.view(1), angle, self.kernel_size)
        return blur(image, kernel)

    def _resize(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not chance(generator, self.resize_probability):
            return image
        scale = float(uniform(generator, *self.resize_scale_range))
        down, up = choice(generator, self.resize_modes), choice(generator, self.resize_modes)
        return resize_round_trip(image, scale, down, up)

    def _noise(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not chance(generator, self.noise_probability):
            return image
        std = float(uniform(generator, *self.noise_level_range)) / 127.5  # 8-bit levels -> [-1, 1]
        channels = 1 if chance(generator, self.gray_noise_probability) else image.shape[1]
        shape = (image.shape[0], channels, *image.shape[2:])
        noise = torch.randn(shape, generator=generator, device=_draw_device(generator))
        return image + std * noise.to(image)

    def _jpeg(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not chance(generator, self.jpeg_probability):
            return image
        low, high = self.jpeg_quality_range
        quality = int(
            torch.randint(
                int(low), int(high) + 1, (1,), generator=generator, device=_draw_device(generator)
            )
        )
        return jpeg(image[0], quality)[None]


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"a degradation takes images [B, 3, H, W], got {list(images.shape)}")


DEGRADATIONS = {"gaussian_blur": GaussianBlurDegradation, "bsr": BSRDegradation}


def build_degradation(
    config: dict | None,
) -> GaussianBlurDegradation | BSRDegradation | None:
    """A degradation from its config block: `{kind: gaussian_blur | bsr, ...its arguments}`;
    None (or kind none) for no corruption."""
    if not config:
        return None
    config = dict(config)
    kind = config.pop("kind", None)
    if kind in (None, "none"):
        if config:
            raise ConfigError(f"{WHERE}: arguments {sorted(config)} given without a kind")
        return None
    if kind not in DEGRADATIONS:
        raise ConfigError(f"{WHERE}.kind={kind!r}: choose one of {sorted(DEGRADATIONS)} or none")
    degradation = DEGRADATIONS[kind]
    return degradation(build_config(degradation.config_class, config, WHERE))
