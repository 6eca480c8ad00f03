"""A test-only callback (imported by spawned DDP processes, so it lives in its own module): records a
fingerprint of each process's torch RNG state at every training step, where the model draws its
noise, timesteps and guidance-drop masks, and writes them per rank at the end of fit with the
rank's own count of skipped samples."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch


class DrawRecorder(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = out
        self.draws: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        state = torch.random.get_rng_state().numpy().tobytes()
        self.draws.append(hashlib.sha1(state).hexdigest()[:12])

    def on_fit_end(self, trainer, pl_module) -> None:
        Path(self.out).mkdir(parents=True, exist_ok=True)
        path = Path(self.out, f"rank{trainer.global_rank}.json")
        skipped = int(getattr(pl_module, "_skipped_total", -1))  # this rank's own count
        path.write_text(json.dumps({"draws": self.draws, "skipped": skipped}))
