"""Two real DDP ranks (CPU, gloo, ddp_spawn) read through ShardDataModule: each rank trains on its
own shards for the same number of steps, and validation is split with no sample seen twice or lost."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import sample_key
from torch import nn

from unclip.data.datamodule import ShardDataModule

SIZES = (2, 9, 4, 7)  # uneven on purpose: rank 0 gets shards 0 and 2 (6 samples), rank 1 16
MAX_STEPS = 6
VAL_MAX = 17  # 16 after cutting to a multiple of 2 ranks


class KeyRecorder(L.LightningModule):
    """Records the keys of every batch; writes them per rank at the end of fit."""

    data_fields = ["txt"]

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.weight = nn.Parameter(torch.zeros(1))
        self.train_keys: list[list[str]] = []
        self.val_keys: list[str] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.train_keys.append(batch["__key__"])
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.global_step == MAX_STEPS // 2:  # the first validation run only
            self.val_keys.extend(batch["__key__"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self) -> None:
        record = {"train": self.train_keys, "val": self.val_keys}
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_ddp_ranks_get_equal_batches_and_disjoint_validation(make_shards, tmp_path: Path) -> None:
    folder = make_shards(sizes=SIZES, fields=("txt",))
    data = ShardDataModule(
        train_shards=str(folder / "train-*.tar"),
        val_shards=str(folder / "train-*.tar"),
        fields=KeyRecorder.data_fields,
        batch_size=3,
        val_batch_size=2,
        num_workers=1,
        shuffle_buffer=4,
        val_max_samples=VAL_MAX,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=MAX_STEPS,
        val_check_interval=MAX_STEPS // 2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(KeyRecorder(str(tmp_path)), datamodule=data)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(r["train"]) for r in ranks] == [MAX_STEPS, MAX_STEPS]
    shards = [{int(k[1:3]) for batch in r["train"] for k in batch} for r in ranks]
    assert shards[0] <= {0, 2} and shards[1] <= {1, 3}, shards
    all_keys = [sample_key(s, i) for s, n in enumerate(SIZES) for i in range(n)]
    val = [r["val"] for r in ranks]
    assert len(val[0]) == len(val[1]) == (VAL_MAX - VAL_MAX % 2) // 2
    assert sorted(val[0] + val[1]) == sorted(all_keys[: VAL_MAX - VAL_MAX % 2])
