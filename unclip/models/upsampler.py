"""The upsampler stages: a diffusion model of a high-resolution image given a low-resolution one.

As in the paper, the low-resolution image is resized to the target size and concatenated to the
noisy input of a UNet without attention; no caption, no CLIP embedding. Training corrupts the
conditioning image (Gaussian blur for 64->256, BSR degradation for 256->1024; see
unclip.models.degradations) and trains on random crops a quarter of the target size; because the
network is purely convolutional, sampling then runs at the full target size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from unclip.models.degradations import build_degradation
from unclip.models.diffusion_stage import DiffusionStage
from unclip.nn.unet import UNet, UNetConfig
from unclip.training.config_check import ConfigError, build_config

RESIZE_MODES = ("bicubic", "bilinear")


@dataclass
class UpsamplerSampling:
    """`model.sampling` of an upsampler: which sampler, beside that sampler's settings."""

    sampler: str = "ddim"


def resize(
    images: torch.Tensor,
    size: int,
    mode: str,
    antialias: bool | None = None,
    clamp: bool = True,
) -> torch.Tensor:
    """Square-resize [B, C, H, W] in [-1, 1]; anti-aliased when shrinking (None), or as told, and
    clamped back to [-1, 1] unless `clamp=False` (diffusers' UnCLIP pipeline enlarges with
    antialias=True and no clamp)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    if antialias is None:
        antialias = size < images.shape[-1]
    out = F.interpolate(
        images, size=(size, size), mode=mode, align_corners=False, antialias=antialias
    )
    return out.clamp(-1, 1) if clamp else out


def random_crops(
    tensors: list[torch.Tensor], size: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """The same random `size` x `size` window of each image, cut from every tensor [B, C, H, W]."""
    b, _, h, w = tensors[0].shape
    if (h, w) == (size, size):
        return tensors
    device = generator.device if generator is not None else torch.device("cpu")
    tops = torch.randint(0, h - size + 1, (b,), generator=generator, device=device).tolist()
    lefts = torch.randint(0, w - size + 1, (b,), generator=generator, device=device).tolist()
    return [
        torch.stack(
            [
                x[i, :, top : top + size, left : left + size]
                for i, (top, left) in enumerate(zip(tops, lefts, strict=True))
            ]
        )
        for x in tensors
    ]


def conditioned(net: torch.nn.Module, cond: torch.Tensor) -> Callable:
    """The diffusion model function: the noisy image and the conditioning image side by side."""

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(torch.cat([x_t, cond.to(x_t.dtype)], dim=1), t)

    return model_fn


@dataclass
class UpsamplerConfig:
    """An upsampler's top-level `model.<key>` settings (the paper's where it gives them);
    conf/model/upsampler*.yaml set the sizes and override the rest."""

    # the target side; the data must be at it (data.image_size)
    image_size: int
    # what upsample() takes: the previous stage's resolution
    low_res_size: int
    name: str = "upsampler"
    # training crops: this fraction of image_size on a side (paper: a quarter)
    crop_fraction: float = 0.25
    # bicubic | bilinear: shrinks the training images (anti-aliased), resizes the conditioning up
    resize_mode: str = "bicubic"
    # diffuse the difference from the resized low-resolution image (not the paper's)
    residual: bool = False
    # lift the low-resolution image with PyTorch's anti-aliased kernel and no clamp, as
    # diffusers' UnCLIP pipeline (and so Karlo's released upsampler) does; the lifts differ by
    # up to 0.17
    lift_antialias: bool = False
    # images upsampled at each validation and scored (val/sample_mse, val/resize_mse); 0: skip
    val_samples: int = 8
    # seeds the validation crops, corruption and noise, and the sampling noise of validation
    val_seed: int = 0
    # the UNet's convolution weights (and so its activations) in NHWC for training too: the
    # convolution kernels run faster on it (bench/unet_bench.py); equal results up to rounding
    channels_last: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.low_res_size < self.image_size:
            raise ConfigError(
                f"model.low_res_size ({self.low_res_size}) must be positive and below "
                f"model.image_size ({self.image_size})"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(
                f"model.resize_mode={self.resize_mode!r}: choose one of {RESIZE_MODES}"
            )
        if not 0 < self.crop_fraction <= 1:
            raise ConfigError(f"model.crop_fraction must be in (0, 1], got {self.crop_fraction}")


class UpsamplerModule(DiffusionStage):
    """`low_res_size` -> `image_size`. `settings`: UpsamplerConfig's keys. The blocks:

    unet: UNetConfig (model_channels, channel_mult, num_res_blocks, dropout, ...), no attention:
    the network's inputs (noisy image + conditioning image) and size follow from the rest.
    diffusion: DiffusionConfig. degradation: `{kind: gaussian_blur | bsr, ...}` or null.
    sampling: the sampler and its settings, the defaults of `upsample`.
    With `residual` a fresh network upsamples like plain resizing, which a tiny model improves
    on quickly; val_samples are scored against the truth and against plain resizing.
    """

    data_fields = ["image"]
    embed_dim = None
    sampling_config = UpsamplerSampling
    config_groups: ClassVar[dict[str, type]] = {**DiffusionStage.config_groups, "unet": UNetConfig}
    settings_config = UpsamplerConfig

    @classmethod
    def validate_config(cls, cfg: dict[str, Any], where: str = "model") -> None:
        super().validate_config(cfg, where)
        build_degradation(cfg.get("degradation"))

    def __init__(
        self,
        unet: dict | None = None,
        diffusion: dict | None = None,
        degradation: dict | None = None,
        sampling: dict | None = None,
        optim: dict | None = None,
        ema: dict | None = None,
        **settings: Any,
    ) -> None:
        config = self.build_settings(settings)
        super().__init__(optim, ema, diffusion, sampling, config.val_seed)
        self.save_settings(config)
        self.name = config.name
        self.image_size = int(config.image_size)
        self.low_res_size = int(config.low_res_size)
        self.crop_size = round(config.image_size * config.crop_fraction)
        self.resize_mode = config.resize_mode
        self.residual = bool(config.residual)
        self.lift_antialias = bool(config.lift_antialias)
        self.val_samples = int(config.val_samples)
        self.net = self._build_unet(unet)
        self.degradation = build_degradation(degradation)
        self.use_channels_last(config.channels_last)
        self.init_ema()

    # ---- construction ---------------------------------------------------------------------------
    def _build_unet(self, unet: dict | None) -> UNet:
        config = build_config(UNetConfig, unet, "model.unet")
        if (unet or {}).get("attention_resolutions"):
            raise ConfigError(
                "model.unet.attention_resolutions must be empty: the upsampler is fully "
                "convolutional so that it trains on crops and samples at full size"
            )
        levels = len(config.channel_mult)
        factor = 2 ** (levels - 1)
        for key, size in (("crop_fraction", self.crop_size), ("image_size", self.image_size)):
            if size % factor:
                raise ValueError(
                    f"model.{key} gives {size}px inputs, not divisible by 2**{levels - 1} "
                    f"(model.unet.channel_mult has {levels} levels)"
                )
        return UNet(
            dataclasses.replace(config, attention_resolutions=()),
            in_channels=6,  # noisy image + resized low-resolution image
            out_channels=6 if self.diffusion.learned_variance else 3,
            image_size=self.crop_size,
        )

    # ---- the conditioning image -----------------------------------------------------------------
    def downsample(self, images: torch.Tensor) -> torch.Tensor:
        """High-resolution images [B, 3, image_size, image_size] -> the low-resolution input."""
        return resize(images, self.low_res_size, self.resize_mode)

    def lift(self, low_res: torch.Tensor) -> torch.Tensor:
        """The low-resolution image resized to the target size: the network's conditioning."""
        if self.lift_antialias:  # exactly as diffusers' UnCLIPPipeline lifts the decoder's image
            return resize(low_res, self.image_size, self.resize_mode, antialias=True, clamp=False)
        return resize(low_res, self.image_size, self.resize_mode)

    def training_pair(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(target crops, conditioning crops) from full-size images: the low-resolution image is
        made and degraded at full size (as the previous stage would see it), then both are cut
        at the same random window."""
        low_res = self.downsample(images)
        if self.degradation is not None:
            low_res = self.degradation(low_res, generator)
        target, cond = random_crops([images, self.lift(low_res)], self.crop_size, generator)
        return target, cond

    def diffused(self, target: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """What the diffusion models: the image, or with `residual` its difference from the
        resized low-resolution image (zero for a fresh network, so training starts at plain
        resizing and only has to learn the detail)."""
        return target - cond if self.residual else target

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.check_image_size(images, self.image_size)

    # ---- training -------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        target, cond = self.training_pair(self._check_images(batch["image"]))
        out = self.diffusion.training_losses(
            conditioned(self.net, cond), self.diffused(target, cond)
        )
        loss = out["loss"].mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/mse", out["mse"].mean())
        if "vb" in out:
            self.log("train/vb", out["vb"].mean())
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The training loss with crops, corruption, timesteps and noise drawn from a generator
        seeded per batch, so validations are comparable; plus, on the first batch, a full-size
        upsampling scored against the truth and against plain resizing."""
        images = self._check_images(batch["image"])
        size = images.shape[0]
        generator = self.val_generator(batch_idx)
        target, cond = self.training_pair(images, generator)
        x0 = self.diffused(target, cond)
        out = self.seeded_losses(conditioned(self.eval_net, cond), x0, generator)
        self.log("val/loss", out["loss"].mean(), batch_size=size, sync_dist=True, prog_bar=True)
        if batch_idx == 0 and self.val_samples > 0:
            truth = images[: self.val_samples]
            low_res = self.downsample(truth)
            samples = self.upsample(low_res, generator=self.generator(self.val_seed))
            count = truth.shape[0]
            sample_mse = F.mse_loss(samples, truth)
            resize_mse = F.mse_loss(self.lift(low_res), truth)
            self.log("val/sample_mse", sample_mse, batch_size=count, sync_dist=True)
            self.log("val/resize_mse", resize_mse, batch_size=count, sync_dist=True)

    # ---- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def upsample(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
        **settings: Any,
    ) -> torch.Tensor:
        """[B, 3, low_res_size, low_res_size] in [-1, 1] -> [B, 3, image_size, image_size], the
        whole image at once; `settings` (sampler, steps, eta, ...) override `model.sampling`."""
        low = self.low_res_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, low, low):
            raise ValueError(
                f"upsample takes images [B, 3, {low}, {low}] (model.low_res_size={low}), "
                f"got {list(images.shape)}"
            )
        cond = self.lift(images.to(self.device, torch.float32))
        sample = self.run_sampler(
            conditioned(self.eval_net, cond),
            tuple(cond.shape),
            self.sampling_settings(**settings),
            generator=generator,
            clip_denoised=(-2.0, 2.0) if self.residual else (-1.0, 1.0),
            progress=progress,
        )
        return (cond + sample if self.residual else sample).clamp(-1, 1)

    @torch.no_grad()
    def sample_grid_images(
        self, batch: dict, n: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """For the SampleGrid callback: `n` validation images shrunk and upsampled again, the
        originals beside them, and captions comparing each one's error with plain resizing."""
        truth = self._check_images(batch["image"][:n]).to(self.device)
        low_res = self.downsample(truth)
        samples = self.upsample(low_res, generator=self.generator(self.val_seed))
        sample_mse = (samples - truth).pow(2).mean(dim=(1, 2, 3))
        resize_mse = (self.lift(low_res) - truth).pow(2).mean(dim=(1, 2, 3))
        captions = [
            f"{self.low_res_size}->{self.image_size} mse {s:.4f} ({self.resize_mode} {r:.4f})"
            for s, r in zip(sample_mse.tolist(), resize_mse.tolist(), strict=True)
        ]
        return samples, truth, captions
