"""L2 normalisation that survives huge finite inputs.

`F.normalize` squares before it sums: a float32 vector with entries above ~1e19 has an infinite
norm and normalises to all zeros, silently (a text condition of zeros, cosine metrics of 0.0).
Dividing such rows by their largest magnitude first keeps every square <= 1; the direction is
unchanged.
"""

from __future__ import annotations

import torch


def unit_norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """`x / |x|` along `dim`, finite for any finite `x` (zero vectors stay zero). Rows whose norm
    does not overflow get exactly `F.normalize`'s result; only the others are rescaled first."""
    norm = x.norm(2, dim, keepdim=True)
    overflow = torch.isinf(norm) & torch.isfinite(x).all(dim, keepdim=True)
    scale = torch.where(overflow, x.abs().amax(dim=dim, keepdim=True), torch.ones_like(norm))
    scaled = x / scale
    norm = torch.where(overflow, scaled.norm(2, dim, keepdim=True), norm)
    return scaled / norm.clamp_min(eps).expand_as(x)
