"""The base of the stages that are Gaussian diffusions: the diffusion prior, the decoder and the
upsamplers. What they share is written here once, so a fix in one reaches all of them:

- the process (`model.diffusion`, a DiffusionConfig) as `self.diffusion`;
- the sampling settings, resolved once: `model.sampling` holds the stage's own keys (its
  `sampling_config` dataclass: guidance_scale, best_of, ... and which `sampler`) beside that
  sampler's settings (steps, eta, ...: unclip.diffusion.samplers), checked at start-up;
  `sampling_settings(**call_arguments)` lays a call's arguments over them;
- the seeded validation loss (timesteps and noise from a generator seeded per batch);
- the size check of batch images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from lightning.pytorch.strategies import FSDPStrategy

from unclip.diffusion import DiffusionConfig, GaussianDiffusion, samplers
from unclip.training.config_check import ConfigError, build_config
from unclip.training.module import UnclipModule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DiffusionStage(UnclipModule):
    """Subclasses set `sampling_config` (a dataclass with a `sampler` field) and build `self.net`."""

    sampling_config: ClassVar[type]

    def __init__(
        self,
        optim: dict | None,
        ema: dict | None,
        diffusion: dict | None,
        sampling: dict | None,
        val_seed: int,
    ) -> None:
        super().__init__(optim, ema)
        self.val_seed = int(val_seed)
        self.diffusion = GaussianDiffusion(self.diffusion_config(diffusion))
        self.sampling = self.resolve_sampling(sampling, "model.sampling")

    def use_channels_last(self, on: bool) -> None:
        """Store the network's 4-D weights NHWC: a convolution given an NHWC weight returns NHWC
        activations, so the whole UNet then runs in that format (inputs need no conversion)."""
        if on:
            self.net.to(memory_format=torch.channels_last)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # FSDP's sharded state dicts (ShardedTensor) take contiguous tensors only: NCHW there
        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            self.to(memory_format=torch.contiguous_format)

    # ---- configuration --------------------------------------------------------------------------
    @classmethod
    def diffusion_config(cls, given: Mapping[str, Any] | None) -> DiffusionConfig:
        return build_config(DiffusionConfig, given, "model.diffusion")

    @classmethod
    def validate_config(cls, cfg: dict[str, Any], where: str = "model") -> None:
        super().validate_config(cfg, where)
        cls.diffusion_config(cfg.get("diffusion"))
        cls.resolve_sampling(cfg.get("sampling"), f"{where}.sampling")

    @classmethod
    def resolve_sampling(
        cls,
        given: Mapping[str, Any] | None,
        where: str,
        base: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """`given` (None values count as unset) over `base` (the defaults when None), checked, as
        one plain dict: the stage's keys and its sampler's. A sampler setting in `base` that a
        newly chosen sampler does not read is dropped; one in `given` is held to account."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        stage_keys = {f.name for f in dataclasses.fields(cls.sampling_config)}
        merged = {**(base or {}), **given}
        stage = build_config(
            cls.sampling_config, {k: v for k, v in merged.items() if k in stage_keys}, where
        )
        if stage.sampler not in samplers.SAMPLERS:
            raise ConfigError(
                f"{where}.sampler={stage.sampler!r}: choose one of {sorted(samplers.SAMPLERS)}"
            )
        config_cls = samplers.SAMPLERS[stage.sampler].config
        reads = {f.name for f in dataclasses.fields(config_cls)}
        sampler_part = {
            k: v for k, v in merged.items() if k not in stage_keys and (k in reads or k in given)
        }
        build_config(config_cls, {k: v for k, v in sampler_part.items() if k in reads}, where)
        try:
            _, config = samplers.resolve({"sampler": stage.sampler, **sampler_part}, where)
        except (TypeError, ValueError) as error:
            raise ConfigError(str(error)) from error
        return {**dataclasses.asdict(stage), **dataclasses.asdict(config)}

    def sampling_settings(self, **call_arguments: Any) -> dict[str, Any]:
        """`model.sampling` with a call's (non-None) arguments laid over it."""
        return self.resolve_sampling(call_arguments, "sampling argument", base=self.sampling)

    def sampler_settings(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The part of resolved settings that the sampler reads (its name included)."""
        stage_keys = {f.name for f in dataclasses.fields(self.sampling_config)} - {"sampler"}
        return {k: v for k, v in settings.items() if k not in stage_keys}

    # ---- sampling and validation ----------------------------------------------------------------
    def run_sampler(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        settings: Mapping[str, Any],
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        clip_denoised: tuple[float, float] | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        return samplers.sample(
            self.diffusion,
            model_fn,
            shape,
            self.sampler_settings(settings),
            noise=noise,
            generator=generator,
            clip_denoised=clip_denoised,
            progress=progress,
            device=self.device,
        )

    def val_generator(self, batch_idx: int) -> torch.Generator:
        """Validation randomness: seeded per batch, so validations are comparable across steps."""
        return self.generator(self.val_seed + batch_idx)

    def seeded_losses(
        self, model_fn: ModelFn, x0: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The training losses at timesteps and noise drawn from `generator`."""
        t = self.diffusion.sample_timesteps(x0.shape[0], self.device, generator)
        noise = samplers.randn(tuple(x0.shape), generator, x0)
        return self.diffusion.training_losses(model_fn, x0, t, noise)

    def check_image_size(self, images: torch.Tensor, size: int) -> torch.Tensor:
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"batch images are {tuple(images.shape[-2:])} but model.image_size={size}: "
                f"set data.image_size={size}"
            )
        return images
