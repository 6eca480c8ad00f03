"""Under DDP every rank draws its own noise, timesteps and drop masks, reproducibly from
(seed, rank): two CPU gloo processes through train.py's code path, run twice."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_runs import overrides, run_train

from unclip.training.seeding import rank_seed


def ddp_draws(shards: Path, runs: Path, name: str) -> list[list[str]]:
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
def test_ddp_ranks_draw_differently_and_a_rerun_repeats_them(make_shards, tmp_path) -> None:
    torch.set_num_threads(1)
    shards = make_shards(sizes=(10, 14, 8, 12), fields=("image", "txt", "img_emb", "txt_emb"))
    first = ddp_draws(shards, tmp_path, "a")
    assert len(first[0]) == len(first[1]) == 3
    assert not set(first[0]) & set(first[1]), f"ranks drew the same numbers: {first}"
    assert ddp_draws(shards, tmp_path, "b") == first
