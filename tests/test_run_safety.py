"""Runs that a crash or a divergence cannot destroy: checkpoints written beside their target and
renamed, resume falling back to the newest loadable checkpoint, and the NaN/inf guard."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny_runs import REPO, compose_train, overrides, run_train
from torch import nn

from unclip.sampling.pipeline import CheckpointError, _load_stage
from unclip.training.checkpoints import FiniteModelCheckpoint, remove_staged
from unclip.training.module import load_module
from unclip.training.nan_guard import NonFiniteError, NonFiniteGuard
from unclip.training.run import resolve_ckpt_path, write_metrics


@pytest.fixture
def shards(make_shards) -> Path:
    return make_shards(sizes=(10, 14, 8, 12), fields=("image", "txt", "img_emb", "txt_emb"))


def all_weights_finite(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_floating_point(v))


# ---- crash-safe checkpoints ----------------------------------------------------------------------
def test_truncated_last_falls_back_to_the_newest_loadable_checkpoint(shards, tmp_path, caplog):
    torch.set_num_threads(1)
    run_train(overrides("prior", shards, tmp_path))
    folder = tmp_path / "prior-test" / "checkpoints"
    last = folder / "last.ckpt"
    size = last.stat().st_size
    with open(last, "r+b") as handle:  # what a kill during a copy into last.ckpt leaves
        handle.truncate(size // 3)
    caplog.set_level(logging.WARNING)
    found = resolve_ckpt_path("last", tmp_path / "prior-test")
    assert found is not None and Path(found).name.startswith("best-step")
    assert any(
        "last.ckpt" in r.getMessage() and "cannot be loaded" in r.getMessage()
        for r in caplog.records
    )
    # and the run resumes from it
    run_train(overrides("prior", shards, tmp_path, "trainer.max_steps=9", "ckpt_path=last"))
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 9


KILLED_SAVE = """
import os, sys, torch
from unclip.training.run import trainer_plugins
io = trainer_plugins()[0]
path = sys.argv[1]
io.save_checkpoint({"state_dict": {"w": torch.zeros(4)}, "global_step": 1}, path)
print("first saved", flush=True)
big = {"state_dict": {"w": torch.ones(48 * 2**20 // 4)}, "global_step": 2}
while True:
    io.save_checkpoint(big, path)
"""


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second filesystem for TMPDIR")
def test_kill_during_a_save_with_tmpdir_elsewhere_keeps_last_whole(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    last = folder / "last.ckpt"
    staging = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="unclip-test-"))
    env = {**os.environ, "TMPDIR": str(staging), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(last)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "first saved"
        first_size = last.stat().st_size
        deadline = time.time() + 60
        # kill as soon as the second, bigger checkpoint is being written, wherever it goes
        while time.time() < deadline:
            staged = [p for p in folder.iterdir() if p != last]
            growing = last.stat().st_size != first_size
            if any(p.stat().st_size > 0 for p in staged if p.exists()) or growing:
                break
            time.sleep(0.002)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        checkpoint = torch.load(last, map_location="cpu", weights_only=True)
        assert checkpoint["global_step"] in (1, 2)
        # (wandb, imported by the training code, makes its own folders in TMPDIR)
        leaked = [p for p in staging.iterdir() if "wandb" not in p.name]
        assert leaked == [], "a staged checkpoint leaked into TMPDIR"
        removed = remove_staged(folder)
        assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"], removed
    finally:
        child.kill()
        shutil.rmtree(staging, ignore_errors=True)


# ---- the NaN/inf guard ---------------------------------------------------------------------------
class NaNAt(L.LightningModule):
    """Fits w to 1; its loss is NaN at the steps in `bad`."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.bad = bad
        self.weights_seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.weights_seen.append(self.w.detach().clone())
        loss = (self.w - 1).pow(2).sum()
        return loss * float("nan") if self.global_step in self.bad else loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)


def guarded_trainer(patience: int, steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        gradient_clip_val=1.0,
        callbacks=[NonFiniteGuard(patience=patience)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_guard_skips_up_to_patience_bad_steps_and_keeps_the_weights() -> None:
    module = NaNAt(bad={3, 4})
    guarded_trainer(patience=2, steps=8).fit(module)
    seen = module.weights_seen
    assert torch.equal(seen[3], seen[4]) and torch.equal(seen[4], seen[5])  # skipped, unchanged
    assert torch.isfinite(module.w).all() and not torch.equal(seen[5], seen[7])  # trains on


def test_guard_stops_after_patience_naming_step_and_stage() -> None:
    module = NaNAt(bad=set(range(3, 64)))
    with pytest.raises(NonFiniteError, match=r"step 5: NaNAt's loss or gradients.*patience=2"):
        guarded_trainer(patience=2, steps=20).fit(module)
    assert torch.isfinite(module.w).all()


def test_divergent_run_stops_and_never_saves_non_finite_weights(shards, tmp_path) -> None:
    torch.set_num_threads(1)
    args = overrides(
        "prior", shards, tmp_path, "model.optim.lr=1e8", "trainer.max_steps=30",
        "callbacks.nan_guard.patience=2", "model.ema.decay=0",
    )  # fmt: skip
    with pytest.raises(NonFiniteError, match="DiffusionPriorModule"):
        run_train(args)
    for path in (tmp_path / "prior-test" / "checkpoints").glob("*.ckpt"):
        assert all_weights_finite(path), path
    assert not (tmp_path / "prior-test" / "metrics.json").exists()


class LogsNaNValLoss(NaNAt):
    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.tensor(float("nan")))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)


def test_best_checkpoint_ignores_a_nan_monitor(tmp_path: Path) -> None:
    best = FiniteModelCheckpoint(dirpath=tmp_path, monitor="val/loss", save_top_k=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, val_check_interval=2, check_val_every_n_epoch=None,
        callbacks=[best], logger=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(LogsNaNValLoss(bad=set()))
    assert list(tmp_path.glob("*.ckpt")) == [] and best.best_model_path == ""


def test_metrics_json_is_valid_json_with_null_for_non_finite(tmp_path: Path) -> None:
    cfg = compose_train(overrides("prior", tmp_path, tmp_path))
    write_metrics(tmp_path, cfg, {"val/loss": float("nan"), "train/loss": 0.5}, 7)

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    record = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert record["metrics"] == {"val/loss": None, "train/loss": 0.5}


def test_sampling_refuses_a_checkpoint_with_non_finite_weights(shards, tmp_path) -> None:
    torch.set_num_threads(1)
    run_train(overrides("prior", shards, tmp_path, "trainer.max_steps=3"))
    good = tmp_path / "prior-test" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(good, map_location="cpu", weights_only=True)
    key = next(k for k, v in checkpoint["state_dict"].items() if torch.is_floating_point(v))
    checkpoint["state_dict"][key] = torch.full_like(checkpoint["state_dict"][key], math.nan)
    bad = tmp_path / "nan.ckpt"
    torch.save(checkpoint, bad)
    assert load_module(good) is not None
    with pytest.raises(ValueError, match=rf"{bad}.*NaN/inf weights \({key}\)"):
        load_module(bad)
    with pytest.raises(CheckpointError, match=r"^prior\.checkpoint="):
        _load_stage(bad, "prior", ("sample",), torch.device("cpu"))
