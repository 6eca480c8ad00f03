"""The validation metrics every prior logs, so a sweep compares diffusion and AR priors directly
(the set DALLE2-pytorch's prior training reports):

- `cosine`: mean cos(sampled z_i, true z_i), what a prior is for;
- `text_baseline_cosine`: mean cos(z_t, true z_i), the zero-effort answer a prior must beat;
- `baseline_diff`: `cosine - text_baseline_cosine` (> 0: the prior beats its own input);
- `text_cosine`: mean cos(sampled z_i, z_t), how close the sample stays to the caption embedding;
- `unrelated_cosine`: mean cos(sampled z_i, the true z_i of another caption of the batch, rolled by
  one): the floor; a prior that ignores its caption scores as high here as on `cosine`;
- `retrieval_acc`: how often a sampled z_i is closer to its own image's embedding than to any other
  image's in the batch (duplicate captions in a batch make this harder than it sounds).

`prior_metric_variants` repeats the set for other sampling step counts and for the online
(non-EMA) weights, under `<weights>/steps<n>/<metric>` and `<weights>/<metric>` (the default step
count), beside the plain names (the EMA weights at the default steps). Both priors log
`online/<metric>`, so a sweep compares their online weights in one column.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from unclip.nn.unit_norm import unit_norm

# what prior_metrics returns: every prior logs them as val/<name>, the sweep summary shows them
PRIOR_METRICS = (
    "cosine",
    "text_baseline_cosine",
    "baseline_diff",
    "text_cosine",
    "unrelated_cosine",
    "retrieval_acc",
)
WEIGHTS = ("ema", "online")
# sample(steps, weights) -> [B, D] sampled z_i; steps None: the stage's default
VariantSampler = Callable[[int | None, str], torch.Tensor]


@torch.no_grad()
def prior_metrics(
    sampled: torch.Tensor, img_emb: torch.Tensor, txt_emb: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Scalar tensors of the metric set above for [B, D] embeddings."""
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
    cosine = (sampled * img_emb).sum(-1).mean()
    baseline = (txt_emb * img_emb).sum(-1).mean()
    return {
        "cosine": cosine,
        "text_baseline_cosine": baseline,
        "baseline_diff": cosine - baseline,
        "text_cosine": (sampled * txt_emb).sum(-1).mean(),
        "unrelated_cosine": (sampled * img_emb.roll(1, dims=0)).sum(-1).mean(),
        "retrieval_acc": (similarity.argmax(dim=-1) == own).float().mean(),
    }


def check_variants(steps: Sequence[int], weights: Sequence[str], where: str) -> None:
    unknown = sorted(set(weights) - set(WEIGHTS))
    if unknown:
        raise ValueError(f"{where}.weights: unknown {unknown}; choose from {list(WEIGHTS)}")
    if any(int(s) < 1 for s in steps):
        raise ValueError(f"{where}.steps must all be at least 1, got {list(steps)}")


def variant_list(steps: Sequence[int], weights: Sequence[str]) -> list[tuple[str, int | None]]:
    """(weights, steps) pairs a validation logs beside its plain names: each weights at the default
    step count (None; EMA there is what the plain names already measure) and at each of `steps`."""
    pairs: list[tuple[str, int | None]] = [(w, None) for w in weights if w != "ema"]
    return pairs + [(w, int(s)) for w in weights for s in steps]


@torch.no_grad()
def prior_metric_variants(
    sample: VariantSampler,
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    variants: Sequence[tuple[str, int | None]],
) -> dict[str, torch.Tensor]:
    """The metric set for each (weights, steps) pair, keyed `<weights>[/steps<n>]/<metric>`."""
    out = {}
    for which, count in variants:
        prefix = which if count is None else f"{which}/steps{int(count)}"
        metrics = prior_metrics(sample(count, which), img_emb, txt_emb)
        out.update({f"{prefix}/{key}": value for key, value in metrics.items()})
    return out
