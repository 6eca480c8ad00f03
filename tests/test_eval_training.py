"""Image metrics during training: a decoder run with `eval.enabled=true` logs eval/fid_clip,
eval/kid_clip and eval/clip_score to the CSV logger and TensorBoard's event file (read back here),
and a prior run is scored through that decoder, beside its own prior metric set."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EVAL_IMAGE_SIZE
from hydra import compose, initialize_config_dir

from unclip.sampling.evaluate import main
from unclip.training.run import train
from unclip.training.summary import collect, summary_table

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
EVAL_KEYS = ("eval/fid_clip", "eval/kid_clip", "eval/clip_score")


def run(overrides: list[str]) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return train(compose("train", overrides=overrides))


def common(shards: Path, runs: Path, name: str) -> list[str]:
    return [
        "data=shapes_emb",
        "trainer=cpu",
        "logger=[csv,tensorboard]",
        "callbacks=[model_checkpoint]",
        f"paths.runs_dir={runs}",
        f"run_name={name}",
        f"data.train_shards={shards}/val-*.tar",
        f"data.val_shards={shards}/val-*.tar",
        f"data.image_size={EVAL_IMAGE_SIZE}",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.shuffle_buffer=0",
        "data.val_max_samples=16",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "eval.enabled=true",
        "eval.every_n_steps=2",
        "eval.num_samples=12",
        "eval.steps=2",
        "eval.reference_samples=48",
        "eval.kid_subset_size=12",
        "eval.kid_subsets=5",
        "eval.grid_samples=2",
    ]


DECODER = [
    "model=decoder",
    f"model.image_size={EVAL_IMAGE_SIZE}",
    "model.net.unet.model_channels=8",
    "model.net.unet.channel_mult=[1,2]",
    "model.net.unet.attention_resolutions=[16]",
    "model.net.unet.num_head_channels=8",
    "model.net.text.width=8",
    "model.net.text.context_length=8",
    "model.net.text.layers=1",
    "trainer.max_steps=4",
]


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    (path,) = run_dir.glob("csv/**/metrics.csv")
    with path.open() as handle:
        return list(csv.DictReader(handle))


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = run_dir.glob("tensorboard/**/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    } | {"__images__": accumulator.Tags()["images"]}


@pytest.fixture(scope="module")
def decoder_run(eval_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    metrics = run(common(eval_shards, runs, "decoder-eval") + DECODER)
    assert all(math.isfinite(metrics[key]) for key in EVAL_KEYS)  # in the run's final metrics
    return runs / "decoder-eval"


def test_a_decoder_run_with_eval_logs_fid_kid_clip_score_to_csv_and_tensorboard(
    decoder_run: Path, eval_shards: Path
) -> None:
    rows = csv_rows(decoder_run)
    for key in EVAL_KEYS:
        steps = [int(r["step"]) for r in rows if r.get(key)]
        assert steps == [2, 4], (key, steps)  # every eval.every_n_steps
        values = [float(r[key]) for r in rows if r.get(key)]
        assert all(math.isfinite(v) for v in values)
    clip_scores = [float(r["eval/clip_score"]) for r in rows if r.get("eval/clip_score")]
    assert all(0 <= v <= 100 for v in clip_scores)
    # an untrained decoder's images are far from real ones
    fids = [float(r["eval/fid_clip"]) for r in rows if r.get("eval/fid_clip")]
    assert min(fids) > 0.1
    scalars = tensorboard_scalars(decoder_run)
    for key in EVAL_KEYS:
        assert [step for step, _ in scalars[key]] == [2, 4]
    csv_fid = [float(r["eval/fid_clip"]) for r in rows if r.get("eval/fid_clip")]
    assert [v for _, v in scalars["eval/fid_clip"]] == pytest.approx(csv_fid, rel=1e-5)
    assert "eval/samples" in scalars["__images__"]
    # the reference statistics were cached beside the shards, with their facts
    cached = sorted(p.suffix for p in (eval_shards / "eval_reference").iterdir())
    assert ".json" in cached and ".npy" in cached
    assert list((decoder_run / "samples").glob("eval-step*.png"))  # the grid, for CSV logging


@pytest.fixture(scope="module")
def prior_run(
    eval_shards: Path, decoder_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, float]]:
    runs = tmp_path_factory.mktemp("prior_runs")
    checkpoint = sorted((decoder_run / "checkpoints").glob("*.ckpt"))[-1]
    prior = [
        "model=prior_diffusion",
        "model.net.width=32",
        "model.net.layers=1",
        "model.text_encoder.width=32",
        "model.text_encoder.layers=1",
        "model.normalization.max_samples=64",
        "model.sampling.steps=4",
        "model.val_variants.steps=[2]",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        f"eval.decoder={checkpoint}",
        "eval.prior_sampling={steps: 2}",
    ]
    metrics = run(common(eval_shards, runs, "prior-eval") + prior)
    return runs, metrics


def test_a_prior_run_is_scored_through_a_decoder_and_the_sweep_table_carries_both(
    prior_run: tuple[Path, dict[str, float]],
) -> None:
    runs, metrics = prior_run
    for key in (*EVAL_KEYS, "eval/prior_cosine", "eval/prior_unrelated_cosine"):
        assert math.isfinite(metrics[key]), key
    assert "val/online/steps2/cosine" in metrics and "val/unrelated_cosine" in metrics
    # the multirun summary shows the eval/* columns beside val/*
    record = collect(runs)
    assert len(record) == 1
    header = summary_table(record)[0]
    assert {"eval/fid_clip", "eval/clip_score", "val/cosine", "val/unrelated_cosine"} <= set(header)


def test_evaluation_run_scores_a_prior_alone_and_through_the_decoder(
    eval_shards: Path, decoder_run: Path, prior_run: tuple[Path, dict[str, float]], tmp_path: Path
) -> None:
    prior = prior_run[0] / "prior-eval" / "checkpoints" / "last.ckpt"
    decoder = decoder_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    main(
        [str(prior), str(decoder), "--shards", f"{eval_shards}/val-*.tar", "--out", str(out),
         "--num-samples", "12", "--reference-samples", "48", "--kid-subset-size", "12",
         "--decoder-steps", "2", "--stack-prior-steps", "2", "--prior-steps", "2", "4",
         "--weights", "ema", "online"]
    )  # fmt: skip
    report = json.loads((out / "eval.json").read_text())
    names = [row["row"] for row in report["rows"]]
    assert names == [
        "prior-eval (ema, 2 steps)",
        "prior-eval (ema, 4 steps)",
        "prior-eval (online, 2 steps)",
        "prior-eval (online, 4 steps)",
        "true z_i -> decoder-eval",
        "prior-eval -> decoder-eval",
    ]
    stack = {row["row"]: row["metrics"] for row in report["rows"]}
    for key in ("fid_clip", "kid_clip", "clip_score", "prior_cosine"):
        assert math.isfinite(stack["prior-eval -> decoder-eval"][key])
    assert "unrelated_cosine" in stack["prior-eval (online, 4 steps)"]
    assert report["reference"]["reused"]  # the decoder run cached it with the same facts
    table = (out / "eval.md").read_text()
    assert (
        table.startswith("| run") and "fid_clip" in table and "prior-eval -> decoder-eval" in table
    )


def test_a_prior_sweep_reports_image_metrics_and_the_prior_set_side_by_side(
    eval_shards: Path, decoder_run: Path, tmp_path: Path
) -> None:
    """`train.py -m model=prior_diffusion,prior_ar` with eval on: both priors through one decoder,
    FID/CLIP score and the prior metric set in one summary table (the paper's Table 2 in small).
    (Hydra composes a multirun's base config with the default model, so no model.* override.)"""
    checkpoint = decoder_run / "checkpoints" / "last.ckpt"
    overrides = [
        o
        for o in common(eval_shards, tmp_path, "unused")
        if not o.startswith(("run_name", "logger"))
    ]
    command = [
        sys.executable, "train.py", "-m", "model=prior_diffusion,prior_ar", "logger=csv",
        "sweep_name=priors", *overrides, "trainer.max_steps=2",
        "trainer.val_check_interval=2", f"eval.decoder={checkpoint}",
    ]  # fmt: skip
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (tmp_path / "multirun" / "priors" / "summary.csv").read_text().splitlines()
    rows = list(csv.reader(summary))
    header, jobs = rows[0], {row[0]: dict(zip(rows[0], row, strict=True)) for row in rows[1:]}
    assert set(jobs) == {"model=prior_diffusion", "model=prior_ar"}
    for column in ("eval/fid_clip", "eval/kid_clip", "eval/clip_score", "eval/prior_cosine",
                   "val/cosine", "val/unrelated_cosine", "val/baseline_diff", "val/online/cosine"):  # fmt: skip
        assert column in header, column
        assert all(job[column] != "-" for job in jobs.values()), column
    assert "eval/fid_clip" in done.stdout  # the printed table
