"""`model.val_variants` of both priors: their validation metric set again for other sampling step
counts and for the online weights, on the first validation batch (names in
unclip.evaluation.prior_metrics), so a sweep reads EMA vs online and steps side by side."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from unclip.evaluation.prior_metrics import check_variants, prior_metric_variants, variant_list
from unclip.models.config_keys import merged

DEFAULT_VARIANTS: dict[str, Any] = {"steps": [], "weights": []}
# sample(captions, txt_emb, steps) -> [B, D], from a fixed seed (the module makes its generator)
StepSampler = Callable[[list[str], torch.Tensor, int | None], torch.Tensor]


def variants_config(given: dict | None, has_steps: bool) -> dict[str, list]:
    cfg = merged(DEFAULT_VARIANTS, given, "model.val_variants")
    cfg = {"steps": [int(s) for s in cfg["steps"] or []], "weights": list(cfg["weights"] or [])}
    if cfg["steps"] and not has_steps:
        raise ValueError("model.val_variants.steps: this prior has no sampling steps; use []")
    check_variants(cfg["steps"], cfg["weights"], "model.val_variants")
    return cfg


def log_prior_variants(module: Any, batch: dict, batch_idx: int, sample: StepSampler) -> None:
    """Log `val/<weights>[/steps<n>]/<metric>` for the module's `val_variants` (first batch only)."""
    cfg = module.val_variants
    variants = variant_list(cfg["steps"], cfg["weights"])
    if batch_idx != 0 or not variants:
        return
    captions, txt_emb = list(batch["txt"]), batch["txt_emb"].float()

    def sample_variant(steps: int | None, weights: str) -> torch.Tensor:
        with module.sampling_weights(weights):
            return sample(captions, txt_emb, steps)

    metrics = prior_metric_variants(sample_variant, batch["img_emb"], txt_emb, variants)
    for key, value in metrics.items():
        module.log(f"val/{key}", value, batch_size=len(captions), sync_dist=True)
