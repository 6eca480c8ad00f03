"""A callback that grades a decoder while it trains, by the independent pixel judge.

Every `every_n_validations` validations (sanity check excluded) a fixed list of benchmark captions
(every single-object caption and `pair_captions` two-object ones) runs through the trained CLIP's
text encoder -> a trained prior -> the decoder being trained; `unclip.evaluation.shapes_judge`
scores the images and the callback logs `bench/<group>/<metric>` (e.g. `bench/held_in_pairs/both`)
plus the judge's own accuracy on real renders at this size, and a captioned grid under `bench/grid` (PNG: samples/bench-step*.png),
so binding can be watched improving on the dashboard. Without a prior, the caption's CLIP text
embedding stands in for the image embedding. Modules other than a decoder are left alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from unclip.evaluation.shapes_judge import (
    judge,
    judge_accuracy,
    parse_caption,
    single_captions,
    summarise,
)
from unclip.evaluation.shapes_judge import pair_captions as benchmark_pairs
from unclip.images import captioned_grid
from unclip.training.sample_grid import enlarge, log_grid_image

log = logging.getLogger(__name__)

METRIC_NAMES = {
    "colour_ok": "colour",
    "shape_ok": "shape",
    "one_object": "one_object",
    "two_objects": "two_objects",
    "colours_ok": "colours",
    "both_ok": "both",
    "relation_ok": "relation",
    "background_error": "background_error",
}


def bench_metrics(summary: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """Flat `prefix/<group>/<metric>` names for a judge summary ("held-in single" ->
    held_in_single)."""
    metrics = {}
    for group, stats in summary.items():
        name = group.replace("-", "_").replace(" ", "_")
        for key, value in stats.items():
            if key in METRIC_NAMES:
                metrics[f"{prefix}/{name}/{METRIC_NAMES[key]}"] = float(value)
    return metrics


class ShapesBench(L.Callback):
    """Benchmark captions -> CLIP -> prior -> the decoder in training, judged from pixels."""

    def __init__(
        self,
        clip: str,
        prior: str | None = None,
        every_n_validations: int = 1,
        samples_per_caption: int = 1,
        pair_captions: int = 8,
        decoder_sampling: dict[str, Any] | None = None,
        prior_sampling: dict[str, Any] | None = None,
        judge_renders: int = 50,
        seed: int = 0,
        key: str = "bench",
        display_size: int = 128,
    ) -> None:
        super().__init__()
        if every_n_validations < 1 or samples_per_caption < 1:
            raise ValueError(
                "callbacks.shapes_bench: every_n_validations and samples_per_caption must be >= 1"
            )
        self.clip_spec, self.prior_path = clip, prior
        self.every_n_validations = every_n_validations
        self.samples_per_caption = samples_per_caption
        self.captions = single_captions() + benchmark_pairs(pair_captions)
        self.decoder_sampling = dict(decoder_sampling or {})
        self.prior_sampling = dict(prior_sampling or {})
        self.judge_renders, self.seed = judge_renders, seed
        self.key, self.display_size = key, display_size
        self._validations = 0
        self._stages: tuple[Any, Any] | None = None
        self._accuracy: dict[str, float] | None = None

    def _load(self, device: torch.device) -> tuple[Any, Any]:
        """The CLIP bundle and the prior (None: text embeddings stand in), loaded once."""
        if self._stages is None:
            from unclip.clip import load_clip
            from unclip.training.module import load_module

            bundle = load_clip(str(self.clip_spec), device=device)
            prior = None
            if self.prior_path:
                if not Path(self.prior_path).is_file():
                    raise FileNotFoundError(
                        f"callbacks.shapes_bench.prior={self.prior_path!r}: no such checkpoint"
                    )
                prior = load_module(self.prior_path, map_location="cpu").to(device).eval()
            self._stages = (bundle, prior)
        return self._stages

    @torch.no_grad()
    def images(self, decoder: L.LightningModule) -> tuple[torch.Tensor, list[str]]:
        """One image per benchmark caption and sample, from fixed seeds."""
        from unclip.clip import encode_texts

        bundle, prior = self._load(decoder.device)
        captions = [c for c in self.captions for _ in range(self.samples_per_caption)]
        generator = torch.Generator(device=decoder.device).manual_seed(self.seed)
        txt_emb = encode_texts(bundle.model, bundle.tokenizer, captions).to(decoder.device)
        img_emb = txt_emb
        if prior is not None:
            img_emb = prior.sample(captions, txt_emb, generator=generator, **self.prior_sampling)
        images = decoder.sample(img_emb, captions, generator=generator, **self.decoder_sampling)
        return images.float().cpu(), captions

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not callable(getattr(pl_module, "invert", None)):
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        images, captions = self.images(pl_module)
        records = [
            judge(image, parse_caption(c)) for image, c in zip(images, captions, strict=True)
        ]
        if self._accuracy is None:
            self._accuracy = judge_accuracy(int(images.shape[-1]), self.judge_renders)
        metrics = bench_metrics(summarise(records), self.key)
        metrics.update(
            {f"{self.key}/judge/{k}": v for k, v in self._accuracy.items() if k not in ("size",)}
        )
        pl_module.log_dict(metrics, sync_dist=False)
        if trainer.is_global_zero:
            n = self.samples_per_caption
            rows = [enlarge(images[i : i + n], self.display_size) for i in range(0, len(images), n)]
            grid = captioned_grid(rows, captions[::n])
            log_grid_image(
                trainer, f"{self.key}/grid", grid, "; ".join(captions[::n]), file_prefix="bench-"
            )
