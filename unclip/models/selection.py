"""Best-of-N selection of sampled CLIP image embeddings, shared by both priors (paper: 2)."""

from __future__ import annotations

import torch

from unclip.nn.unit_norm import unit_norm


def best_by_dot_product(candidates: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    """[B, N, D] candidates -> [B, D]: per caption, the one with the highest dot product with z_t."""
    scores = (candidates * unit_norm(txt_emb)[:, None]).sum(-1)
    best = scores.argmax(dim=1)
    return candidates[torch.arange(len(candidates), device=candidates.device), best]
