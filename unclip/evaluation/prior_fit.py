"""How close the prior's sampled image embeddings come to the true ones of held-in and held-out
images: mean cosine, beside the cosine the caption's own text embedding has (the zero-effort
baseline a prior must beat)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

PriorSampler = Callable[[list[str], torch.Tensor], torch.Tensor]


@torch.no_grad()
def cosine_to_truth(
    sample_prior: PriorSampler,
    captions: Sequence[str],
    txt_emb: torch.Tensor,
    img_emb: torch.Tensor,
    batch_size: int = 128,
) -> dict[str, float]:
    """`cosine`: mean cos(sampled z_i, true z_i); `text_baseline_cosine`: mean cos(z_t, true
    z_i) (the names prior_metrics logs in validation)."""
    if not len(captions) == len(txt_emb) == len(img_emb):
        raise ValueError(
            f"{len(captions)} captions, {len(txt_emb)} txt_emb, {len(img_emb)} img_emb"
        )
    sims = []
    for start in range(0, len(captions), batch_size):
        stop = start + batch_size
        predicted = sample_prior(list(captions[start:stop]), txt_emb[start:stop])
        truth = img_emb[start:stop].to(predicted.device)
        sims.append(F.cosine_similarity(predicted.float(), truth.float(), dim=-1).cpu())
    baseline = F.cosine_similarity(txt_emb.float(), img_emb.float(), dim=-1)
    return {
        "cosine": float(torch.cat(sims).mean()),
        "text_baseline_cosine": float(baseline.mean()),
        "samples": float(len(captions)),
    }
