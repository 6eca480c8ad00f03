"""train.py end to end through Hydra: the CLIP stage learns, a killed run resumes where it stopped,
and DDP trains with two CPU processes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from unclip.training.run import build, train

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    subprocess.run(
        [
            sys.executable, "-m", "unclip.data.shapes", "--out", str(root / "shapes"),
            "--size", "32", "--train", "1200", "--val", "128", "--holdout", "64",
            "--shard-size", "300", "--workers", "1",
        ],
        check=True,
        cwd=REPO,
    )  # fmt: skip
    return root


def clip_overrides(data_root: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "model=clip",
        "data=shapes",
        "trainer=cpu",
        "logger=csv",
        "callbacks=default",
        f"paths.data_dir={data_root}",
        f"paths.runs_dir={runs}",
        "run_name=clip-test",
        "data.image_size=32",
        "data.batch_size=32",
        "data.val_batch_size=64",
        "data.num_workers=0",
        "data.persistent_workers=false",
        "data.val_max_samples=128",
        "data.shuffle_buffer=200",
        "trainer.val_check_interval=40",
        "trainer.limit_val_batches=2",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=5",
        "callbacks.last_checkpoint.every_n_train_steps=20",
        "model.optim.warmup_steps=10",
        *extra,
    ]


def run_train(overrides: list[str]) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return train(cfg)


def logged(run_dir: Path, key: str) -> list[tuple[int, float]]:
    rows = []
    for path in sorted(run_dir.glob("csv/**/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    rows.append((int(row["step"]), float(row[key])))
    return rows


def test_clip_stage_trains_through_hydra_and_its_loss_falls(shapes_dir: Path, tmp_path: Path):
    torch.set_num_threads(1)
    metrics = run_train(clip_overrides(shapes_dir, tmp_path, "trainer.max_steps=80"))
    run_dir = tmp_path / "clip-test"
    losses = [v for _, v in logged(run_dir, "train/loss")]
    assert len(losses) >= 8
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, f"train/loss did not fall: {losses}"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "val/loss" in metrics and (run_dir / "metrics.json").is_file()
    # the learning rate is on the logger too (LR monitor)
    assert logged(run_dir, "lr-AdamW/pg1")


def test_resume_from_last_continues_the_step_count(shapes_dir: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    run_dir = tmp_path / "clip-test"
    last = run_dir / "checkpoints" / "last.ckpt"
    run_train(
        clip_overrides(shapes_dir, tmp_path, "trainer.max_steps=40", "model.ema={decay:0.99}")
    )
    first = torch.load(last, map_location="cpu", weights_only=True)
    assert first["global_step"] == 40

    run_train(
        clip_overrides(
            shapes_dir, tmp_path, "trainer.max_steps=60", "model.ema={decay:0.99}", "ckpt_path=last"
        )
    )
    second = torch.load(last, map_location="cpu", weights_only=True)
    assert second["global_step"] == 60
    # the optimiser, the scheduler and the EMA carried on rather than starting again
    adam_steps = {float(s["step"]) for s in second["optimizer_states"][0]["state"].values()}
    assert adam_steps == {60.0}
    assert second["lr_schedulers"][0]["last_epoch"] == 60
    ema_steps = [v for k, v in second["state_dict"].items() if k.endswith("num_updates")]
    assert ema_steps and int(ema_steps[0]) == 60
    steps_logged = [s for s, _ in logged(run_dir, "train/loss")]
    assert max(steps_logged) >= 55


@pytest.mark.skipif(sys.platform != "linux", reason="two gloo processes on one CPU host")
def test_ddp_trains_with_two_cpu_processes(shapes_dir: Path, tmp_path: Path) -> None:
    overrides = clip_overrides(
        shapes_dir,
        tmp_path,
        "strategy=ddp",
        "trainer.devices=2",
        "trainer.max_steps=10",
        "trainer.val_check_interval=10",
        "run_name=clip-ddp",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(
        tmp_path / "clip-ddp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert checkpoint["global_step"] == 10
    assert "Starting with 2 processes" in result.stdout + result.stderr


def test_logger_none_keeps_the_default_callbacks_and_trains(shapes_dir: Path, tmp_path: Path):
    """Lightning's LearningRateMonitor raises without a logger; `logger=none` drops only it."""
    torch.set_num_threads(1)
    args = [
        a for a in clip_overrides(shapes_dir, tmp_path, "trainer.max_steps=2") if a != "logger=csv"
    ]
    args.append("logger=none")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=args)
    _, _, trainer = build(cfg)
    kinds = {type(c).__name__ for c in trainer.callbacks}
    assert "LearningRateMonitor" not in kinds and "FiniteModelCheckpoint" in kinds
    assert not trainer.loggers
    train(cfg)
    last = torch.load(tmp_path / "clip-test" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
