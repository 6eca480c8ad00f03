"""Checkpoints a crash cannot destroy, and resuming from the newest one that still loads.

Lightning's `_atomic_save` stages through fsspec, which writes the staged file in `TMPDIR` and then
*moves* it: across filesystems (node-local /tmp, runs on a network filesystem: the usual cluster)
that move is a copy straight into `last.ckpt`, so a kill during it leaves a torso of a checkpoint
and the staged file behind. Here a local checkpoint is written beside its target (same folder, so
same filesystem), flushed to disk, then renamed over the target: the old file stays whole until the
new one is complete. A killed save leaves only a hidden `.NAME.partial-PID` file, removed at the
next start.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

STAGED_MARK = ".partial-"
SHARDED_METADATA = ".metadata"  # what torch.distributed.checkpoint writes in a sharded checkpoint


def staged_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{STAGED_MARK}{os.getpid()}")


def _is_local(path: Any) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


def save_beside_and_rename(checkpoint: dict[str, Any], path: Path) -> None:
    """torch.save to a staged file in the target's folder, fsync, rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = staged_path(path)
    try:
        with open(staged, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with crash-safe local writes; remote URLs keep Lightning's path."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_beside_and_rename(checkpoint, Path(str(path).removeprefix("file://")))


def remove_staged(folder: Path) -> list[Path]:
    """Delete what killed saves left behind in `folder`; returns the removed paths."""
    removed = []
    if folder.is_dir():
        for path in folder.glob(f".*{STAGED_MARK}*"):
            path.unlink(missing_ok=True)
            removed.append(path)
    for path in removed:
        log.info("removed %s, left by an interrupted checkpoint save", path)
    return removed


def loadable(path: Path) -> str | None:
    """None when `path` is a checkpoint that loads, else why not (one line)."""
    if path.is_dir():
        if (path / SHARDED_METADATA).is_file():
            return None
        return f"sharded checkpoint folder without {SHARDED_METADATA}"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - truncation, garbage, a zip torso: all unloadable
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return "no state_dict in it"
    return None


def newest_loadable(folder: Path, first: Path | None = None) -> Path | None:
    """`first` (usually last.ckpt) if it loads, else the newest checkpoint in `folder` that does;
    every broken one is named in a warning."""
    candidates = [first] if first is not None and first.exists() else []
    others = [p for p in folder.glob("*.ckpt") if p != first] if folder.is_dir() else []
    candidates += sorted(others, key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        problem = loadable(path)
        if problem is None:
            return path
        log.warning("checkpoint %s cannot be loaded (%s): trying an older one", path, problem)
    return None


def is_finite_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


class FiniteModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that never ranks a NaN/inf monitor: Lightning would save it as the first
    `best` (it scores NaN as inf, which still fills an empty top-k)."""

    def _save_topk_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
        if self.monitor is not None and self.monitor in monitor_candidates:
            value = monitor_candidates[self.monitor]
            if not is_finite_number(value):
                log.warning(
                    "step %d: %s is %s; not a candidate for the best checkpoint",
                    trainer.global_step,
                    self.monitor,
                    float(value),
                )
                return
        super()._save_topk_checkpoint(trainer, monitor_candidates)
