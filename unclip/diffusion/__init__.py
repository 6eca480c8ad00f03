"""The Gaussian diffusion process shared by the diffusion prior, the decoder and the upsamplers."""

from unclip.diffusion.gaussian_diffusion import PREDICTIONS, SAMPLERS, GaussianDiffusion
from unclip.diffusion.guidance import classifier_free_guidance, guide
from unclip.diffusion.schedules import SCHEDULES, make_beta_schedule, strided_timesteps

__all__ = [
    "PREDICTIONS",
    "SAMPLERS",
    "SCHEDULES",
    "GaussianDiffusion",
    "classifier_free_guidance",
    "guide",
    "make_beta_schedule",
    "strided_timesteps",
]
