"""Per-rank randomness: every rank draws its own noise, timesteps and guidance-drop masks.

`seed_everything(seed)` runs before the trainer starts its processes, and Lightning re-applies that
one seed in every process: all ranks would draw identical noise at every step, wasting half the
noise samples of a 2-GPU run. This callback reseeds torch, numpy and `random` in each process from
(seed, global rank, step) when training starts: after the network is initialised (identically on
every rank, as DDP needs) and before the first batch. The step makes a resumed run draw fresh
numbers instead of replaying those of step 0. DataLoader workers get their own streams from these
(Lightning's worker_init_fn, enabled by `seed_everything(..., workers=True)`, mixes in the worker id
and rank), and the shard streams seed themselves from (seed, step, rank, worker, epoch).
"""

from __future__ import annotations

import hashlib
import random

import lightning as L
import numpy as np
import torch


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed unique to (seed, rank, step), the same on every machine and Python."""
    digest = hashlib.sha256(f"unclip/{seed}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_process(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class RankSeed(L.Callback):
    """Reseeds each process from (seed, global rank, global step) at the start of training."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = int(seed)
        self.applied: int | None = None  # the seed this process drew with (for tests and logs)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.applied = rank_seed(self.seed, trainer.global_rank, trainer.global_step)
        seed_process(self.applied)
