"""A callback that shows what a generative stage makes: a captioned grid of validation samples,
each beside its ground-truth image, logged to whichever loggers the run has.

Stages opt in by offering `sample_grid_images(batch, n) -> (samples, ground_truth, captions)`;
for any other module the callback does nothing, so it can sit in the default callback list.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image

from unclip.images import captioned_grid

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"


def pair_rows(
    samples: torch.Tensor, ground_truth: torch.Tensor, display_size: int | None = None
) -> list[torch.Tensor]:
    """One row per item: its sample, then its ground truth at the sample's size; both enlarged
    (nearest neighbour, so pixels stay honest) by the integer factor that reaches `display_size`."""
    samples = samples.detach().float().cpu()
    ground_truth = ground_truth.detach().float().cpu()
    if ground_truth.shape[-2:] != samples.shape[-2:]:
        ground_truth = F.interpolate(
            ground_truth, size=samples.shape[-2:], mode="bilinear", antialias=True
        )
    factor = max(1, math.ceil((display_size or 0) / samples.shape[-1]))
    if factor > 1:
        samples = F.interpolate(samples, scale_factor=factor, mode="nearest")
        ground_truth = F.interpolate(ground_truth, scale_factor=factor, mode="nearest")
    return [
        torch.stack([sample, truth]) for sample, truth in zip(samples, ground_truth, strict=True)
    ]


class SampleGrid(L.Callback):
    """Every `every_n_validations` validations (sanity check excluded), sample `num_samples` items
    of the first validation batch and log the grid under `key`: `WandbLogger.log_image`,
    TensorBoard's `add_image`, and a PNG under `<run dir>/samples/` for CSV logging or no logger.
    Small images are enlarged to about `display_size` pixels so their captions fit above them."""

    def __init__(
        self,
        every_n_validations: int = 1,
        num_samples: int = 8,
        key: str = "val/samples",
        display_size: int = 128,
    ) -> None:
        super().__init__()
        if every_n_validations < 1 or num_samples < 1:
            raise ValueError(
                "callbacks.sample_grid: every_n_validations and num_samples must be at least 1"
            )
        self.every_n_validations = every_n_validations
        self.num_samples = num_samples
        self.key = key
        self.display_size = display_size
        self._batch: dict | None = None
        self._validations = 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and isinstance(batch, dict):
            self._batch = batch

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batch, self._batch = self._batch, None
        if trainer.sanity_checking or batch is None:
            return
        if not callable(getattr(pl_module, "sample_grid_images", None)):
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        # every rank samples (a sharded network needs them all); rank 0 logs
        samples, truth, captions = pl_module.sample_grid_images(batch, self.num_samples)
        if trainer.is_global_zero:
            grid = captioned_grid(pair_rows(samples, truth, self.display_size), captions)
            self.log_grid(trainer, grid, captions)

    def log_grid(self, trainer: L.Trainer, grid: Image.Image, captions: list[str]) -> None:
        log_grid_image(trainer, self.key, grid, "sample | ground truth: " + "; ".join(captions))


def log_grid_image(
    trainer: L.Trainer, key: str, grid: Image.Image, caption: str, file_prefix: str = ""
) -> None:
    """A grid image on every logger of the run: a wandb image, a TensorBoard image, and a PNG
    under `<run dir>/samples/` for CSV logging or no logger (file named by key and step)."""
    step = trainer.global_step
    file_wanted = not trainer.loggers
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [grid], step=step, caption=[caption])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, np.asarray(grid), step, dataformats="HWC")
        elif isinstance(logger, CSVLogger):
            file_wanted = True
    if file_wanted:
        folder = Path(trainer.default_root_dir) / SAMPLES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{file_prefix}step{step:07d}.png"
        grid.save(path)
        log.info("sample grid written to %s", path)
