"""Errors a user can fix print as one line (the traceback only with HYDRA_FULL_ERROR=1): a bad
start-up value, and the max_bad_fraction stop raised inside a DataLoader worker."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import TINY_EMBED_DIM, sample_key, write_tar
from hydra.errors import InstantiationException
from tiny_runs import REPO, overrides

from unclip.data.decoding import DataError
from unclip.training.errors import one_line, user_error


def train_cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **env}
    environment.pop("HYDRA_FULL_ERROR", None) if "HYDRA_FULL_ERROR" not in env else None
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_worker_and_instantiate_wrappers_are_unwrapped() -> None:
    worker = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        'last):\n  File "x.py", line 1, in f\nunclip.data.decoding.DataError: 9 of 10 samples '
        "failed, more than data.max_bad_fraction=0.1"
    )
    assert one_line(worker) == "9 of 10 samples failed, more than data.max_bad_fraction=0.1"
    try:
        try:
            raise ValueError("model.net.width must be positive")
        except ValueError as cause:
            raise InstantiationException("Error in call to target 'x'") from cause
    except InstantiationException as wrapped:
        assert str(user_error(wrapped)) == "model.net.width must be positive"
    assert user_error(TypeError("a bug")) is None


def test_a_start_up_error_is_one_line(tmp_path: Path) -> None:
    args = overrides("prior", tmp_path / "nowhere", tmp_path)
    result = train_cli(args)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: data.train_shards=") and "no shard found" in lines[-1]
    assert "Traceback" not in result.stderr
    full = train_cli(args, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr


def test_the_max_bad_fraction_stop_from_a_worker_is_one_line(tmp_path: Path) -> None:
    good = io.BytesIO()
    np.save(good, np.ones(TINY_EMBED_DIM, dtype=np.float32))
    samples = [
        {
            "__key__": sample_key(0, i),
            "txt": b"a caption",
            "img_emb.npy": b"garbage",
            "txt_emb.npy": good.getvalue(),
        }
        for i in range(40)
    ]
    write_tar(tmp_path / "shards" / "train-000000.tar", samples)
    args = overrides(
        "prior", tmp_path / "shards", tmp_path, "data.val_shards=null", "data.num_workers=1",
        "model.normalization.kind=l2", "data.min_samples_for_abort=8", "data.max_bad_fraction=0.1",
        "trainer.val_check_interval=100",
    )  # fmt: skip
    result = train_cli(args)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "more than data.max_bad_fraction=0.1" in errors[0], result.stderr[
        -2000:
    ]
    assert "Traceback" not in result.stderr
