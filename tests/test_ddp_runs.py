"""Two CPU gloo processes through train.py's code path, run twice: every rank draws its own noise,
timesteps and drop masks, reproducibly from (seed, rank), and the skipped-sample count in the logs
and checkpoints is the sum over ranks, including samples skipped while reading validation data and
fitting statistics."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_EMBED_DIM, sample_key, write_tar
from tiny_runs import overrides, run_train

from unclip.training.module import SKIPPED_KEY
from unclip.training.seeding import rank_seed


def npy(vector: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, vector)
    return buffer.getvalue()


def with_bad_samples_in_shard_1(make_shards) -> Path:
    """Rank 1 reads shards 1 and 3; every other sample of shard 1 has an unreadable img_emb."""
    folder = make_shards(sizes=(10, 14, 8, 12), fields=("image", "txt", "img_emb", "txt_emb"))
    good = np.ones(TINY_EMBED_DIM, dtype=np.float32)
    samples = [
        {
            "__key__": sample_key(1, i),
            "txt": f"caption 1 {i}".encode(),
            "img_emb.npy": b"not an array" if i % 2 else npy(good),
            "txt_emb.npy": npy(good),
        }
        for i in range(14)
    ]
    write_tar(folder / "train-000001.tar", samples)
    return folder


def last_logged(run_dir: Path, key: str) -> float:
    rows = [r for p in run_dir.glob("csv/**/metrics.csv") for r in csv.DictReader(p.open())]
    return [float(r[key]) for r in rows if r.get(key)][-1]


def ddp_draws(shards: Path, runs: Path, name: str) -> list[dict]:
    out = runs / f"draws-{name}"
    run_train(
        overrides(
            "prior", shards, runs, "strategy.name=ddp_spawn", "trainer.devices=2",
            "trainer.max_steps=3", f"run_name={name}",
            "+callbacks.draws._target_=rank_draws.DrawRecorder", f"+callbacks.draws.out={out}",
        )
    )  # fmt: skip
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_seeds_differ_by_rank_and_step() -> None:
    seeds = {rank_seed(0, r, s) for r in range(4) for s in (0, 100)}
    assert len(seeds) == 8 and rank_seed(0, 1, 0) == rank_seed(0, 1, 0)


@pytest.mark.skipif(sys.platform != "linux", reason="two gloo processes on one CPU host")
def test_ddp_ranks_draw_differently_a_rerun_repeats_them_and_skips_add_up(make_shards, tmp_path):
    torch.set_num_threads(1)
    shards = with_bad_samples_in_shard_1(make_shards)
    first = ddp_draws(shards, tmp_path, "a")
    draws = [r["draws"] for r in first]
    assert len(draws[0]) == len(draws[1]) == 3
    assert not set(draws[0]) & set(draws[1]), f"ranks drew the same numbers: {draws}"
    assert [r["draws"] for r in ddp_draws(shards, tmp_path, "b")] == draws

    # rank 0 trains on clean shards: its count is what validation and statistics skipped
    own = [r["skipped"] for r in first]
    assert own[0] > 0 and own[1] > 0, own
    checkpoint = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint[SKIPPED_KEY] == sum(own)
    assert last_logged(tmp_path / "a", "data/skipped_total") == sum(own)
