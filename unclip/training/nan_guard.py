"""Stop a run whose loss or gradients go NaN/inf before it can overwrite good weights.

A bad step (non-finite loss on any rank, or non-finite gradients) is skipped: its gradients are
dropped before clipping and the optimiser step, so the weights stay as they were. `patience` bad
steps in a row are tolerated (a rare overflow is not worth a dead run); one more stops the run with
the step and the stage named. A checkpoint is never written from non-finite weights: the save is
refused and the run stops, so `last.ckpt` and `best` keep the last good weights.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf (loss, gradients or weights)."""


def local_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The parts of a (possibly sharded: ShardedTensor, DTensor) tensor held by this process."""
    if hasattr(tensor, "local_shards"):
        return [shard.tensor for shard in tensor.local_shards()]
    if hasattr(tensor, "to_local"):
        return [tensor.to_local()]
    return [tensor]


def all_finite(tensors: list[torch.Tensor]) -> bool:
    parts = [part for t in tensors for part in local_parts(t)]
    floats = [t for t in parts if torch.is_floating_point(t) and t.numel()]
    if not floats:
        return True
    # one max-|x| per tensor in a single foreach call (a squared norm could overflow a huge finite
    # gradient to inf): NaN and inf propagate into it, so one check covers every tensor
    peaks = torch._foreach_norm(floats, float("inf"))
    return bool(torch.isfinite(torch.stack(peaks)).all())


def first_non_finite(state_dict: dict[str, Any]) -> str | None:
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and not all_finite([value]):
            return key
    return None


class NonFiniteGuard(L.Callback):
    """Skips steps with a non-finite loss or gradients; stops after `patience` in a row."""

    def __init__(self, patience: int = 5) -> None:
        super().__init__()
        if patience < 0:
            raise ValueError(f"callbacks.nan_guard.patience must not be negative, got {patience}")
        self.patience = patience
        self.streak = 0
        self.skipped = 0
        self._loss_bad = False

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        # accumulated micro-batches: one bad loss spoils the whole step
        self._loss_bad = self._loss_bad or not bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        bad = self._loss_bad or not all_finite(grads)
        self._loss_bad = False
        # every rank takes the same decision (gradients are shared, losses are not)
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self.streak = 0
            return
        self.streak += 1
        self.skipped += 1
        for param in params:
            param.grad = None
        step, stage = trainer.global_step, type(pl_module).__name__
        if self.streak > self.patience:
            raise NonFiniteError(
                f"step {step}: {stage}'s loss or gradients were NaN/inf for {self.streak} steps in a "
                f"row (callbacks.nan_guard.patience={self.patience}); stopped with the last good "
                f"weights in the checkpoints. Lower model.optim.lr or check the data."
            )
        log.warning(
            "step %d: %s's loss or gradients are NaN/inf: step skipped (%d in a row, patience %d)",
            step,
            stage,
            self.streak,
            self.patience,
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.skipped:
            pl_module.log("train/nonfinite_skipped_steps", float(self.skipped), on_step=True)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        bad_key = first_non_finite(checkpoint.get("state_dict", {}))
        if trainer.strategy.reduce_boolean_decision(bad_key is not None, all=False):
            raise NonFiniteError(
                f"step {trainer.global_step}: {type(pl_module).__name__}'s weights hold NaN/inf"
                f"{f' ({bad_key})' if bad_key else ''}; refusing to overwrite a checkpoint with "
                f"them. Lower model.optim.lr or check the data."
            )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
