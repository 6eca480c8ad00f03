"""L2 normalisation that survives huge finite inputs.

`F.normalize` squares before it sums: a float32 vector with entries above ~1e19 has an infinite
norm and normalises to all zeros, silently (a text condition of zeros, cosine metrics of 0.0).
Dividing by the largest magnitude first keeps every square <= 1; the direction is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unit_norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """`x / |x|` along `dim`, finite for any finite `x` (zero vectors stay zero)."""
    scale = x.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return F.normalize(x / scale, dim=dim, eps=eps)
