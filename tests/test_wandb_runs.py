"""One dashboard run per job: a Hydra multirun of two jobs with wandb offline (no network) gives
two wandb runs with their own ids (kept in each job's folder), the sweep's name as group and the
swept value as a tag, each finished before the next job starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tiny_runs import REPO, overrides


def test_multirun_jobs_get_their_own_finished_wandb_runs(make_shards, tmp_path: Path) -> None:
    shards = make_shards(sizes=(10, 14, 8, 12), fields=("image", "txt", "img_emb", "txt_emb"))
    args = overrides(
        "prior", shards, tmp_path, "logger=wandb", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "model.optim.lr=0.001,0.002", "sweep_name=lr-sweep",
    )  # fmt: skip
    env = {
        **os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wc"),
        "PYTHONPATH": str(REPO),
    }  # fmt: skip
    result = subprocess.run(
        [sys.executable, "train.py", "-m", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "multirun" / "lr-sweep"
    ids = [(sweep / str(job) / "wandb_id").read_text().strip() for job in (0, 1)]
    assert ids[0] != ids[1]
    for job, (run_id, lr) in enumerate(zip(ids, ("0.001", "0.002"), strict=True)):
        runs = list((sweep / str(job) / "wandb").glob("offline-run-*"))
        assert [r.name.rsplit("-", 1)[1] for r in runs] == [run_id], runs
        record = next(runs[0].glob("*.wandb")).read_bytes()
        assert b"lr-sweep" in record and f"model.optim.lr={lr}".encode() in record
        # finished by the job itself, before the next job started
        assert f"finishing run unclip/{run_id}" in (runs[0] / "logs" / "debug.log").read_text()
