"""Where the prior diffuses: CLIP image embeddings mapped to a space of unit-scale coordinates.

The paper does not fix this; the open implementations differ, so it is a config choice:
  - "standardize": per-dimension (z - mean) / std, with mean and std fitted on training embeddings
    (Karlo / diffusers' `clip_mean`, `clip_std`). The statistics are buffers, saved in the
    checkpoint, so a loaded prior needs no data.
  - "l2": z / |z| * sqrt(d) (DALLE2-pytorch), nothing to fit.
`denormalize` maps back to CLIP space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from unclip.nn.unit_norm import unit_norm

KINDS = ("standardize", "l2")


@dataclass
class EmbeddingNormConfig:
    """`model.normalization` of the diffusion prior: `max_samples` training embeddings fit the
    standardisation statistics."""

    kind: str = "standardize"
    max_samples: int = 10000
    eps: float = 1e-6


class EmbeddingNorm(nn.Module):
    def __init__(self, kind: str, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"model.normalization.kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.dim = dim
        self.eps = eps
        if kind == "standardize":
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("std", torch.ones(dim))
            self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def needs_fit(self) -> bool:
        return self.kind == "standardize" and not bool(self.fitted)

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor) -> None:
        """Per-dimension mean and std of [N, dim] CLIP embeddings (a no-op for "l2")."""
        if self.kind != "standardize":
            return
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"fitting embedding statistics needs [N, {self.dim}] embeddings, "
                f"got {tuple(embeddings.shape)}"
            )
        if len(embeddings) < 2:
            raise ValueError(
                f"fitting embedding statistics needs at least 2 samples, got {len(embeddings)}"
            )
        embeddings = embeddings.double()
        self.mean.copy_(embeddings.mean(0))
        self.std.copy_(embeddings.std(0).clamp_min(self.eps))
        self.fitted.fill_(True)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """CLIP space -> the prior's space."""
        if self.kind == "l2":
            return unit_norm(z) * math.sqrt(self.dim)
        return (z - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The prior's space -> CLIP space."""
        if self.kind == "l2":
            return x / math.sqrt(self.dim)
        return x * self.std + self.mean

    def extra_repr(self) -> str:
        return f"kind={self.kind}, dim={self.dim}"
