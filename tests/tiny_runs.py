"""Tiny train.py configs (seconds on one CPU core) for the tests of run robustness: a diffusion prior
and a decoder on the shard fixtures of conftest.py (embed_dim 8, 12x12 images)."""

from __future__ import annotations

from pathlib import Path

from conftest import TINY_EMBED_DIM
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from unclip.training.run import train

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

COMMON = [
    "trainer=cpu",
    "logger=csv",
    "callbacks=default",
    "~callbacks.progress_bar",
    "~callbacks.sample_grid",
    "data.batch_size=8",
    "data.val_batch_size=8",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "data.shuffle_buffer=16",
    "data.val_max_samples=16",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "+trainer.enable_model_summary=false",
    "callbacks.last_checkpoint.every_n_train_steps=3",
    f"model.embed_dim={TINY_EMBED_DIM}",
    "model.optim.warmup_steps=0",
    "model.optim.schedule=constant",
    "model.ema.decay=0.9",
]

PRIOR = [
    "model=prior_diffusion",
    "model.net.width=16",
    "model.net.layers=1",
    "model.net.heads=2",
    "model.text_encoder.width=16",
    "model.text_encoder.context_length=8",
    "model.text_encoder.layers=1",
    "model.text_encoder.heads=2",
    "model.diffusion.num_timesteps=50",
    "model.normalization.max_samples=16",
    "model.sampling.steps=2",
    "model.sampling.best_of=1",
]

DECODER = [
    "model=decoder",
    "model.image_size=16",
    "data.image_size=16",
    "model.net.unet.model_channels=8",
    "model.net.unet.channel_mult=[1,2]",
    "model.net.unet.attention_resolutions=[8]",
    "++model.net.unet.context_resolutions=[16]",
    "model.net.unet.num_head_channels=8",
    "model.net.text.width=16",
    "model.net.text.context_length=8",
    "model.net.text.layers=1",
    "model.net.text.heads=2",
    "model.diffusion.num_timesteps=50",
    "model.sampling.steps=2",
]

STAGES = {"prior": PRIOR, "decoder": DECODER}


def key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def overrides(stage: str, shards: Path, runs: Path, *extra: str) -> list[str]:
    """The tiny `stage` on `shards`, runs under `runs`; `extra` replaces defaults of the same key."""
    base = [
        *STAGES[stage],
        "data=shapes_emb",
        f"data.train_shards={shards}/train-*.tar",
        f"data.val_shards={shards}/train-*.tar",
        f"paths.runs_dir={runs}",
        f"run_name={stage}-test",
        *COMMON,
    ]
    replaced = {key(e) for e in extra}
    return [o for o in base if key(o) not in replaced] + list(extra)


def compose_train(args: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=args)


def run_train(args: list[str]) -> dict[str, float]:
    return train(compose_train(args))
