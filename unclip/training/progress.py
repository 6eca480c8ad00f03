"""A progress display that suits where the output goes: Rich's live bar in a terminal, and in a
log file (a cluster job's stdout) one plain line every `log_every` steps, with no carriage returns
or colour codes to turn the log into a single unreadable line."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar


class LineProgress(ProgressBar):
    """`step 200/1000 (20%) | 4.1 steps/s | eta 3m15s | train/loss 0.1234`, every `log_every`."""

    def __init__(self, log_every: int = 50) -> None:
        super().__init__()
        self.log_every = max(1, int(log_every))
        self._enabled = True
        self._started = 0.0
        self._first_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._started, self._first_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if self._enabled and trainer.is_global_zero and (step % self.log_every == 0):
            print(self.line(trainer, pl_module), flush=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._enabled and trainer.is_global_zero and not trainer.sanity_checking:
            values = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if "val" in k}
            print(f"validation at step {trainer.global_step}: {format_metrics(values)}", flush=True)

    def line(self, trainer: L.Trainer, pl_module: Any) -> str:
        step, total = trainer.global_step, trainer.max_steps
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        rate = (step - self._first_step) / elapsed
        parts = [f"step {step}/{total}" + (f" ({100 * step / total:.0f}%)" if total > 0 else "")]
        parts.append(f"{rate:.2f} steps/s")
        if total > 0 and rate > 0:
            parts.append(f"eta {format_seconds((total - step) / rate)}")
        metrics = {
            k: v for k, v in self.get_metrics(trainer, pl_module).items() if k.startswith("train")
        }
        if metrics:
            parts.append(format_metrics(metrics))
        return " | ".join(parts)


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_metrics(metrics: dict[str, Any]) -> str:
    def text(value: Any) -> str:
        try:
            return f"{float(value):.4g}"
        except (TypeError, ValueError):
            return str(value)

    return " ".join(f"{k} {text(v)}" for k, v in sorted(metrics.items()) if k != "v_num")


def progress_bar(refresh_rate: int = 1, log_every: int = 50) -> ProgressBar:
    """RichProgressBar when stdout is a terminal, else LineProgress."""
    if sys.stdout.isatty():
        return RichProgressBar(refresh_rate=refresh_rate)
    return LineProgress(log_every=log_every)
