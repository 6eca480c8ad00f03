"""The training-time image evaluation (`eval.enabled=true`): every `eval.every_n_steps` steps (and
at the last step), generate one image per caption of a fixed validation subset and log FID/KID/CLIP
score (`eval/*`) and a captioned grid to every logger, and into the run's final metrics.

The stack is whatever the trained module is part of: a decoder run generates through the prior
checkpoint `eval.prior` when given (else from the true z_i); a prior run generates through the
decoder checkpoint `eval.decoder` (required), so a sweep over priors compares them through one
decoder. All evaluation logic lives in `unclip.evaluation`; this callback only wires the stages in.
Every rank runs the same generation (a sharded network needs all ranks); rank 0 logs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from unclip.evaluation.features import load_features
from unclip.evaluation.generation import (
    EvalSettings,
    EvalSubset,
    Evaluator,
    generate,
    read_subset,
    stage_role,
)
from unclip.images import captioned_grid
from unclip.training.module import load_module
from unclip.training.sample_grid import log_grid_image, pair_rows

log = logging.getLogger(__name__)

PREFIX = "eval/"


class GenerationEval(L.Callback):
    """Every argument is an `eval.*` config key (conf/eval/default.yaml documents them)."""

    def __init__(
        self,
        shards: str | list[str] | None,
        every_n_steps: int = 1000,
        num_samples: int = 256,
        steps: int | None = 25,
        guidance_scale: float | None = None,
        batch_size: int = 32,
        seed: int = 0,
        feature_model: str | None = None,
        reference_samples: int = 1000,
        kid_subsets: int = 50,
        kid_subset_size: int = 1000,
        precision_recall_k: int | None = 3,
        feature_extractor_weights_path: str | None = None,
        cache_dir: str | None = None,
        prior: str | None = None,
        prior_sampling: dict | None = None,
        decoder: str | None = None,
        upsamplers: Sequence[str] = (),
        grid_samples: int = 8,
        display_size: int = 128,
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("eval.shards: name the embedded validation shards to evaluate on")
        for key, value in {
            "every_n_steps": every_n_steps,
            "num_samples": num_samples,
            "batch_size": batch_size,
        }.items():
            if int(value) < 1:
                raise ValueError(f"eval.{key} must be at least 1, got {value}")
        if num_samples < 2:
            raise ValueError(
                f"eval.num_samples must be at least 2 (FID needs two), got {num_samples}"
            )
        self.settings = EvalSettings(
            shards=shards,
            reference_samples=reference_samples,
            kid_subsets=kid_subsets,
            kid_subset_size=kid_subset_size,
            precision_recall_k=precision_recall_k,
            feature_extractor_weights_path=feature_extractor_weights_path,
            cache_dir=cache_dir,
        )
        self.every_n_steps = int(every_n_steps)
        self.num_samples = int(num_samples)
        self.decoder_kwargs = {
            k: v
            for k, v in {"steps": steps, "guidance_scale": guidance_scale}.items()
            if v is not None
        }
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.feature_model = feature_model
        self.paths = {"prior": prior, "decoder": decoder, "upsamplers": list(upsamplers)}
        self.prior_kwargs = dict(prior_sampling or {})
        self.grid_samples, self.display_size = int(grid_samples), int(display_size)
        self._evaluator: Evaluator | None = None
        self._subset: EvalSubset | None = None
        self._real: torch.Tensor | None = None
        self._stages: dict[str, Any] = {}
        self._last_step = -1

    # ---- set-up ----------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        role = stage_role(pl_module)
        if role not in ("decoder", "prior"):
            raise ValueError(
                f"eval.enabled: {type(pl_module).__name__} is no decoder or prior; set eval.enabled=false"
            )
        is_decoder = role == "decoder"
        if is_decoder and self.paths["decoder"]:
            raise ValueError("eval.decoder is for prior runs; this run trains the decoder")
        if not is_decoder and not self.paths["decoder"]:
            raise ValueError(
                "eval.decoder: a prior run is scored through a decoder: name its checkpoint"
            )
        self._stages = {
            "prior": _load(self.paths["prior"], "eval.prior") if is_decoder else pl_module,
            "decoder": pl_module if is_decoder else _load(self.paths["decoder"], "eval.decoder"),
            "upsamplers": [
                _load(p, f"eval.upsamplers[{i}]") for i, p in enumerate(self.paths["upsamplers"])
            ],
        }

    def _prepare(self, device: torch.device) -> Evaluator:
        if self._evaluator is None:
            with_prior = self._stages["prior"] is not None
            self._subset = read_subset(self.settings.shards, self.num_samples, with_prior)
            features = load_features(self.feature_model, self.settings.shards, device)
            self._evaluator = Evaluator(features, self.settings, self.image_size)
            self._real = _real_images(self.settings.shards, self.grid_samples, self.image_size)
        return self._evaluator

    @property
    def image_size(self) -> int:
        last = (self._stages["upsamplers"] or [self._stages["decoder"]])[-1]
        return int(last.image_size)

    # ---- the hook --------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        step = trainer.global_step
        due = step % self.every_n_steps == 0 or (
            trainer.max_steps > 0 and step >= trainer.max_steps
        )
        if not due or step == self._last_step:
            return
        self._last_step = step
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            metrics, images = self.evaluate(pl_module.device)
        finally:
            for module, training in modes.items():
                module.training = training
        logged = {PREFIX + key: value for key, value in metrics.items()}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=step)
            self.log_grid(trainer, images)
        log.info("eval at step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in logged.items()))

    @torch.no_grad()
    def evaluate(self, device: torch.device) -> tuple[dict[str, float], torch.Tensor]:
        evaluator = self._prepare(device)
        prior, decoder = self._stages["prior"], self._stages["decoder"]
        for module in [prior, decoder, *self._stages["upsamplers"]]:
            if module is not None:
                module.to(device)
        generated = generate(
            self._subset,
            lambda z, captions, g: decoder.sample(z, captions, generator=g, **self.decoder_kwargs),
            None
            if prior is None
            else lambda captions, txt, g: prior.sample(
                captions, txt, generator=g, **self.prior_kwargs
            ),
            [lambda x, g, up=up: up.upsample(x, generator=g) for up in self._stages["upsamplers"]],
            batch_size=self.batch_size,
            seed=self.seed,
            device=device,
        )
        return evaluator.score(generated, self._subset), generated.images

    def log_grid(self, trainer: L.Trainer, images: torch.Tensor) -> None:
        n = min(self.grid_samples, len(images), len(self._real))
        if n < 1:
            return
        captions = self._subset.captions[:n]
        grid = captioned_grid(pair_rows(images[:n], self._real[:n], self.display_size), captions)
        caption = "generated | real: " + "; ".join(captions)
        log_grid_image(trainer, PREFIX + "samples", grid, caption, file_prefix="eval-")


def _load(path: str | None, key: str) -> Any:
    if not path:
        return None
    try:
        return load_module(path).eval()
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"{key}={path!r}: {error}") from error


def _real_images(shards: str | list[str], count: int, image_size: int) -> torch.Tensor:
    from unclip.data.samples import read_samples

    if count < 1:
        return torch.zeros(0, 3, image_size, image_size)
    batch = read_samples(shards, ["image"], count, image_size=image_size, config_key="eval.shards")
    return batch["image"]


def generation_eval(cfg: dict[str, Any]) -> GenerationEval | None:
    """The callback from the `eval` config node, or None when `eval.enabled` is false."""
    import inspect

    cfg = dict(cfg)
    if not cfg.pop("enabled", False):
        return None
    known = set(inspect.signature(GenerationEval).parameters)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown config key eval.{unknown[0]}; known: {sorted(known)}")
    return GenerationEval(**cfg)
