"""`model.val_variants` of both priors: their validation metric set again for other sampling step
counts and for the online weights, on the first validation batch (names in
unclip.evaluation.prior_metrics), so a sweep reads EMA vs online and steps side by side."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from unclip.evaluation.prior_metrics import check_variants, prior_metric_variants, variant_list
from unclip.training.config_check import ConfigError, build_config

# sample(captions, txt_emb, steps) -> [B, D], from a fixed seed (the module makes its generator)
StepSampler = Callable[[list[str], torch.Tensor, int | None], torch.Tensor]


@dataclass
class ValVariants:
    """steps: extra sampling step counts (diffusion prior only); weights: ema | online."""

    steps: list[int] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)


def variants_config(given: dict | None, has_steps: bool) -> ValVariants:
    cfg = build_config(ValVariants, given, "model.val_variants")
    cfg = ValVariants([int(s) for s in cfg.steps or []], list(cfg.weights or []))
    if cfg.steps and not has_steps:
        raise ConfigError("model.val_variants.steps: this prior has no sampling steps; use []")
    try:
        check_variants(cfg.steps, cfg.weights, "model.val_variants")
    except ValueError as error:
        raise ConfigError(str(error)) from error
    return cfg


def log_prior_variants(module: Any, batch: dict, batch_idx: int, sample: StepSampler) -> None:
    """Log `val/<weights>[/steps<n>]/<metric>` for the module's `val_variants` (first batch only)."""
    variants = variant_list(module.val_variants.steps, module.val_variants.weights)
    if batch_idx != 0 or not variants:
        return
    captions, txt_emb = list(batch["txt"]), batch["txt_emb"].float()

    def sample_variant(steps: int | None, weights: str) -> torch.Tensor:
        with module.sampling_weights(weights):
            return sample(captions, txt_emb, steps)

    metrics = prior_metric_variants(sample_variant, batch["img_emb"], txt_emb, variants)
    for key, value in metrics.items():
        module.log(f"val/{key}", value, batch_size=len(captions), sync_dist=True)
