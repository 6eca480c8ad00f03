"""The validation metrics every prior logs, so a sweep compares diffusion and AR priors directly.

- `cosine`: mean cos(sampled z_i, true z_i), what a prior is for;
- `text_baseline_cosine`: mean cos(z_t, true z_i), the zero-effort answer a prior must beat;
- `retrieval_acc`: how often a sampled z_i is closer to its own image's embedding than to any other
  image's in the batch (duplicate captions in a batch make this harder than it sounds).
"""

from __future__ import annotations

import torch

from unclip.nn.unit_norm import unit_norm

# what prior_metrics returns: every prior logs them as val/<name>, the sweep summary shows them
PRIOR_METRICS = ("cosine", "text_baseline_cosine", "retrieval_acc")


@torch.no_grad()
def prior_metrics(
    sampled: torch.Tensor, img_emb: torch.Tensor, txt_emb: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Scalar tensors `cosine`, `text_baseline_cosine`, `retrieval_acc` for [B, D] embeddings."""
    if not sampled.shape == img_emb.shape == txt_emb.shape or sampled.ndim != 2:
        raise ValueError(
            f"prior_metrics needs three [B, D] tensors of one shape, got sampled "
            f"{tuple(sampled.shape)}, img_emb {tuple(img_emb.shape)}, txt_emb {tuple(txt_emb.shape)}"
        )
    sampled = unit_norm(sampled.float())
    img_emb = unit_norm(img_emb.float().to(sampled.device))
    txt_emb = unit_norm(txt_emb.float().to(sampled.device))
    similarity = sampled @ img_emb.T
    own = torch.arange(len(sampled), device=sampled.device)
    return {
        "cosine": (sampled * img_emb).sum(-1).mean(),
        "text_baseline_cosine": (txt_emb * img_emb).sum(-1).mean(),
        "retrieval_acc": (similarity.argmax(dim=-1) == own).float().mean(),
    }
