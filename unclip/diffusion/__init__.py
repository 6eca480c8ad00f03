"""The Gaussian diffusion process shared by the diffusion prior, the decoder and the upsamplers:
the forward process and losses (gaussian_diffusion), the samplers (samplers) and classifier-free
guidance (guidance)."""

from unclip.diffusion.gaussian_diffusion import PREDICTIONS, DiffusionConfig, GaussianDiffusion
from unclip.diffusion.guidance import classifier_free_guidance, guide, guide_halves, is_guided
from unclip.diffusion.samplers import SAMPLERS, ddim_invert, resolve, sample
from unclip.diffusion.schedules import SCHEDULES, make_beta_schedule, strided_timesteps

__all__ = [
    "PREDICTIONS",
    "SAMPLERS",
    "SCHEDULES",
    "DiffusionConfig",
    "GaussianDiffusion",
    "classifier_free_guidance",
    "ddim_invert",
    "guide",
    "guide_halves",
    "is_guided",
    "make_beta_schedule",
    "resolve",
    "sample",
    "strided_timesteps",
]
