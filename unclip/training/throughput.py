"""Throughput on the dashboard: samples/s and steps/s (Lightning's ThroughputMonitor) and the share
of each step spent waiting for data (what tells a slow loader from a slow model)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor


def batch_size(batch: Any) -> int:
    """Samples in one of our batches (a dict with `__key__`), or the first dimension of a tensor."""
    if isinstance(batch, dict) and "__key__" in batch:
        return len(batch["__key__"])
    if isinstance(batch, dict):
        batch = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    return int(batch.shape[0])


def throughput_monitor(window_size: int = 20) -> ThroughputMonitor:
    """`train/samples_per_sec` and `train/batches_per_sec` (summed over ranks; `train/device/...`
    per rank) over the last `window_size` steps, logged every `trainer.log_every_n_steps`."""
    return ThroughputMonitor(batch_size_fn=batch_size, window_size=window_size)


class DataWait(L.Callback):
    """Logs `train/data_wait_ms` (mean wait for a batch) and `train/data_wait_fraction` (of the wall
    time between logs): the gap from one step's end to the next step's start is the loader's."""

    def __init__(self) -> None:
        super().__init__()
        self._last_end: float | None = None
        self._start = 0.0
        self._wait = 0.0
        self._busy = 0.0
        self._steps = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, idx: int
    ) -> None:
        self._start = time.perf_counter()
        if self._last_end is not None:
            self._wait += self._start - self._last_end
            self._steps += 1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._last_end = time.perf_counter()
        self._busy += self._last_end - self._start
        if self._steps and trainer._logger_connector.should_update_logs:
            total = self._wait + self._busy
            pl_module.log("train/data_wait_ms", 1000 * self._wait / self._steps, on_step=True)
            pl_module.log("train/data_wait_fraction", self._wait / total, on_step=True)
            self._wait = self._busy = 0.0
            self._steps = 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._last_end = None  # validation time is no data wait

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._last_end = time.perf_counter()
