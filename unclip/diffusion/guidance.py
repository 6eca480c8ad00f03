"""Classifier-free guidance (Ho & Salimans): push the conditional prediction away from the
unconditional one. The one implementation the decoder, the diffusion prior and the AR prior use.

The conditional and unconditional rows run as one doubled batch (conditional half first). With
learned variances only the mean channels are guided; the variance comes from the conditional
output, as in GLIDE."""

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


def guide_halves(output: torch.Tensor, scale: float, channels: int | None = None) -> torch.Tensor:
    """Guide the output of a doubled batch: [2B, ...] (conditional rows first) -> [B, ...]."""
    cond, uncond = output.chunk(2)
    return guide(cond, uncond, scale, channels)


def is_guided(scale: float) -> bool:
    """Scale 1 is the plain conditional model: no unconditional rows are needed."""
    return float(scale) != 1.0


def classifier_free_guidance(
    doubled_fn: ModelFn, scale: float, channels: int | None = None
) -> ModelFn:
    """A model function for the samplers from `doubled_fn`, which runs a doubled batch whose
    conditioning holds the conditional rows, then the unconditional ones. Scale 1: `doubled_fn`
    itself, whose conditioning is then not doubled (one call, half the rows)."""
    if not is_guided(scale):
        return doubled_fn

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guide_halves(doubled_fn(torch.cat([x, x]), torch.cat([t, t])), scale, channels)

    return guided
