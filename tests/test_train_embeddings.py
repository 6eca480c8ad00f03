"""Both priors train through train.py from a clip-retrieval embedding folder (no tars), resume
with ckpt_path=last where the data left off, and under two DDP ranks read disjoint rows that cover
the data."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from laion_layout import laion_folder, numbered_keys
from torch import nn

from unclip.data.embeddings import EmbeddingDataModule
from unclip.training.run import train

CONF = Path(__file__).resolve().parents[1] / "conf"
DIM = 16
SIZES = (40, 56, 32)  # 128 rows; 16 held out for validation

TINY = {
    "prior_diffusion": [
        "model.net.width=32", "model.net.layers=1", "model.net.heads=2",
        "model.text_encoder.width=32", "model.text_encoder.layers=1",
        "model.text_encoder.heads=2", "model.text_encoder.context_length=8",
        "model.sampling.steps=4", "model.sampling.best_of=1",
        "model.normalization.max_samples=64", "model.optim.warmup_steps=5",
    ],
    "prior_ar": [
        "model.num_components=8", "model.num_buckets=8", "+model.dot_buckets=4",
        "+model.fit_samples=64", "model.net.width=32", "model.net.layers=1", "model.net.heads=2",
        "model.text_encoder.width=32", "model.text_encoder.layers=1",
        "model.text_encoder.heads=2", "model.text_encoder.context_length=8",
        "model.optim.warmup_steps=5", "model.optim.lr=1e-2", "data.batch_size=32",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def laion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("laion")
    partitions = numbered_keys(SIZES)
    rng = np.random.default_rng(3)
    partitions = [list(rng.permutation(keys)) for keys in partitions]  # rows out of tar order
    laion_folder(root, partitions, DIM)
    return root


def overrides(model: str, root: Path, runs: Path, *extra: str) -> list[str]:
    return [
        f"model={model}", "data=embeddings", f"data.root={root}", "trainer=cpu", "logger=csv",
        f"paths.runs_dir={runs}", "run_name=prior", f"model.embed_dim={DIM}",
        f"data.embed_dim={DIM}", "data.batch_size=8", "data.num_workers=0",
        "data.pin_memory=false", "data.chunk_rows=16", "data.shuffle_buffer=32",
        "data.val_rows=16", "trainer.val_check_interval=20", "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=2",
        "callbacks=[model_checkpoint]", "callbacks.last_checkpoint.every_n_train_steps=20",
        *TINY[model], *extra,
    ]  # fmt: skip


def run_train(args: list[str]) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return train(compose("train", overrides=args))


def train_losses(run: Path) -> list[float]:
    rows = []
    for path in sorted(run.glob("csv/**/metrics.csv")):
        with path.open() as f:
            rows += [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    return rows


@pytest.mark.parametrize("model", ["prior_diffusion", "prior_ar"])
def test_prior_trains_from_embeddings_and_resumes(model, laion, tmp_path: Path, caplog) -> None:
    torch.set_num_threads(1)
    metrics = run_train(overrides(model, laion, tmp_path, "trainer.max_steps=40"))
    losses = train_losses(tmp_path / "prior")
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
    assert np.isfinite(metrics["val/loss"])
    last = tmp_path / "prior" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 40
    with caplog.at_level(logging.INFO, logger="unclip.data.embeddings"):
        run_train(overrides(model, laion, tmp_path, "trainer.max_steps=50", "ckpt_path=last"))
    assert "resumes after 40 batches" in caplog.text
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 50


class KeyRecorder(L.LightningModule):
    data_fields = ["txt", "img_emb", "txt_emb"]

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.weight = nn.Parameter(torch.zeros(1))
        self.keys: list[str] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        assert batch["img_emb"].shape == (len(batch["__key__"]), DIM)
        self.keys += batch["__key__"]
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self) -> None:
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.keys))


@pytest.mark.slow
def test_two_ddp_ranks_read_disjoint_rows_covering_the_data(laion, tmp_path: Path) -> None:
    data = EmbeddingDataModule(
        str(laion), fields=KeyRecorder.data_fields, embed_dim=DIM, batch_size=8, num_workers=0,
        chunk_rows=8, shuffle_buffer=16,
    )  # fmt: skip
    steps = sum(SIZES) // 2 // 8  # one pass: 8 batches per rank
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(KeyRecorder(str(tmp_path)), datamodule=data)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == steps * 8
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(k for keys in numbered_keys(SIZES) for k in keys)
