"""What a run shows: throughput (samples/s, steps/s, data wait) on the logger, and a progress
display that stays readable when stdout is a log file rather than a terminal."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from tiny_runs import CONF, overrides, run_train


def rows(run_dir: Path) -> list[dict]:
    return [r for p in run_dir.glob("csv/**/metrics.csv") for r in csv.DictReader(p.open())]


def test_throughput_and_a_plain_progress_log(make_shards, tmp_path, capsys) -> None:
    torch.set_num_threads(1)
    shards = make_shards(sizes=(10, 14, 8, 12), fields=("image", "txt", "img_emb", "txt_emb"))
    args = overrides(
        "prior", shards, tmp_path, "callbacks.throughput.window_size=2",
        "callbacks.progress_bar.log_every=2",
    )  # fmt: skip
    run_train([a for a in args if a != "~callbacks.progress_bar"])
    out = capsys.readouterr().out
    assert "step 2/6 (33%)" in out and "step 6/6 (100%)" in out and "steps/s" in out
    assert any(
        line.startswith("validation at step 3:") and "val/loss" in line for line in out.splitlines()
    )
    assert "\r" not in out and "\x1b[" not in out  # no carriage returns, no colour codes
    logged = rows(tmp_path / "prior-test")
    samples_per_sec = [
        float(r["train/device/samples_per_sec"])
        for r in logged
        if r.get("train/device/samples_per_sec")
    ]
    assert samples_per_sec and all(v > 0 for v in samples_per_sec)
    assert any(r.get("train/device/batches_per_sec") for r in logged)
    waits = [
        float(r["train/data_wait_fraction"]) for r in logged if r.get("train/data_wait_fraction")
    ]
    assert waits and all(0 <= w < 1 for w in waits)
    assert any(r.get("train/data_wait_ms") for r in logged)


def test_the_slurm_launcher_composes() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            # the README's example, one point of its sweep
            overrides=[
                "hydra/launcher=submitit_slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=1",
                "hydra.launcher.timeout_min=60",
                "model=prior_ar",
                "data=shapes_emb",
                "trainer=gpu",
                "sweep_name=priors",
            ],  # fmt: skip
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert (
        launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert launcher.timeout_min == 60
