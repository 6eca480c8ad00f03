"""FSDP on every stage, through a test-only CPU strategy (tests/fsdp_cpu.py, two gloo processes):
the prior and the decoder train with EMA on and gradient clipping, validate (on full weights) and
checkpoint; full and sharded checkpoints resume and load for sampling; the prior's EMA equals the
same run's under DDP."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny_runs import overrides, run_train

from unclip.training.module import load_module

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="two gloo processes on one host")

FSDP = [
    "strategy=fsdp",
    "strategy._target_=fsdp_cpu.cpu_test_fsdp_strategy",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.devices=2",
    "trainer.gradient_clip_val=1.0",
]
DDP = ["strategy.name=ddp_spawn", "trainer.devices=2", "trainer.gradient_clip_val=1.0"]


@pytest.fixture
def shards(make_shards) -> Path:
    return make_shards(sizes=(10, 14, 8, 12), fields=("image", "txt", "img_emb", "txt_emb"))


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_fsdp_prior_matches_ddp_and_resumes_from_a_full_checkpoint(shards, tmp_path) -> None:
    torch.set_num_threads(1)
    run_train(overrides("prior", shards, tmp_path, *FSDP, "run_name=fsdp"))
    run_train(overrides("prior", shards, tmp_path, *DDP, "run_name=ddp"))
    last = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    fsdp, ddp = state(last), state(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    assert fsdp.keys() == ddp.keys()
    ema = [k for k in fsdp if k.startswith("ema.module.") and torch.is_floating_point(fsdp[k])]
    assert ema and int(fsdp["ema.num_updates"]) == 6
    for key in ema:
        torch.testing.assert_close(fsdp[key], ddp[key], atol=1e-5, rtol=1e-4, msg=key)
    moved = max((fsdp[k] - fsdp[k.replace("ema.module.", "net.")]).abs().max() for k in ema)
    assert moved > 0  # the EMA averaged rather than copied

    run_train(
        overrides(
            "prior",
            shards,
            tmp_path,
            *FSDP,
            "run_name=fsdp",
            "trainer.max_steps=8",
            "ckpt_path=last",
        )
    )
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 8 and int(resumed["state_dict"]["ema.num_updates"]) == 8
    prior = load_module(last)
    sampled = prior.sample(["caption 0 1", "caption 2 3"], torch.randn(2, 8), steps=2, best_of=1)
    assert sampled.shape == (2, 8) and torch.isfinite(sampled).all()


def test_fsdp_decoder_with_sharded_checkpoints_resumes_and_samples(shards, tmp_path) -> None:
    torch.set_num_threads(1)
    args = [*FSDP, "strategy.state_dict_type=sharded", "run_name=dec", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "callbacks.last_checkpoint.every_n_train_steps=2"]  # fmt: skip
    with_grid = [
        a for a in overrides("decoder", shards, tmp_path, *args) if a != "~callbacks.sample_grid"
    ]
    metrics = run_train([*with_grid, "callbacks.sample_grid.num_samples=2"])
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert sorted(p.name for p in (tmp_path / "dec" / "samples").glob("*.png")) == [
        "step0000002.png",
        "step0000004.png",
    ]  # the sample grid, drawn from the full EMA weights
    last = tmp_path / "dec" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / ".metadata").is_file()  # sharded: one folder, every rank
    run_train(
        overrides("decoder", shards, tmp_path, *args, "trainer.max_steps=6", "ckpt_path=last")
    )
    decoder = load_module(last)
    assert int(decoder.ema.num_updates) == 6
    images = decoder.sample(
        torch.nn.functional.normalize(torch.randn(2, 8), dim=-1), ["a", "b"], steps=2
    )
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
