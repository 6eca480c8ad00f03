"""Classifier-free guidance (Ho & Salimans): push the conditional prediction away from the
unconditional one. With learned variances only the mean channels are guided; the variance comes
from the conditional output, as in GLIDE."""

from __future__ import annotations

from collections.abc import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guide(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float, channels: int | None = None
) -> torch.Tensor:
    """`uncond + scale * (cond - uncond)` over the first `channels` channels (all when None)."""
    if channels is None:
        return uncond + scale * (cond - uncond)
    mean = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([mean, cond[:, channels:]], dim=1)


def classifier_free_guidance(
    cond_fn: ModelFn, uncond_fn: ModelFn, scale: float, channels: int | None = None
) -> ModelFn:
    """A model function for the samplers; scale 1 is the plain conditional model (one call)."""
    if scale == 1.0:
        return cond_fn

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guide(cond_fn(x, t), uncond_fn(x, t), scale, channels)

    return guided
