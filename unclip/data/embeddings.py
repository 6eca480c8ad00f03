"""`EmbeddingDataModule` (`data=embeddings`): the priors train on clip-retrieval's / LAION's
published embedding folders (see `unclip.data.embedding_folder`) with no tar and no pixels.

Batches carry the shard datamodule's prior keys (`__key__`, `txt`, `img_emb`, `txt_emb`,
`skipped`; docs/architecture.md). Which CLIP made the embeddings, their size and whether they are
unit-norm come from the config (`data.clip`, `data.embed_dim`, `data.normalized`): they play the
part of a shard set's meta.json, so a model of another `embed_dim` fails at start-up naming both,
and every partition's files are checked against them before the first step.

Resume: the training stream's row order is a pure function of (seed, pass, rank, worker), so
`train_dataloader()` starts it at `trainer.global_step x accumulate_grad_batches` batches, which
a resumed run has restored from its checkpoint: the run carries on in the interrupted run's order
(same pass, same window, next row) instead of replaying or reshuffling; see `EmbeddingStream`. As
for shards, the skipped-row total lives in the checkpoint (`UnclipModule`) and keeps counting.
The last `val_rows` rows (in partition order) are held out of training and validated on.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from unclip.data.decoding import SkipTracker
from unclip.data.embedding_folder import Partition, find_partitions
from unclip.data.embedding_stream import EmbeddingStream, Piece, first_rows
from unclip.data.format import check_fields
from unclip.data.streams import Collate, as_is
from unclip.data.values import check_data_values

log = logging.getLogger(__name__)

EMBEDDING_ROW_FIELDS = ("txt", "img_emb", "txt_emb")


class RowsDataset(Dataset):
    """Rows held in memory, as samples for `Collate`."""

    def __init__(self, keys: list, captions: list, img: np.ndarray, txt: np.ndarray) -> None:
        self.keys, self.captions, self.img, self.txt = keys, captions, img, txt

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "__key__": self.keys[index],
            "txt": self.captions[index],
            "img_emb": torch.from_numpy(self.img[index]),
            "txt_emb": torch.from_numpy(self.txt[index]),
        }


def split_off_tail(sizes: list[int], tail: int) -> tuple[list[int], list[Piece]]:
    """(training rows per partition, the held-out ranges): the last `tail` rows in partition order."""
    train = list(sizes)
    held: list[Piece] = []
    for index in reversed(range(len(train))):
        if tail <= 0:
            break
        take = min(tail, train[index])
        train[index] -= take
        held.insert(0, (index, train[index], train[index] + take))
        tail -= take
    return train, held


class EmbeddingDataModule(L.LightningDataModule):
    """Prior batches from a clip-retrieval embedding folder; every argument is a `data.*` key."""

    def __init__(
        self,
        root: str,
        fields: list[str] | None = None,
        name: str = "embeddings",
        clip: str = "unknown",
        embed_dim: int = 768,
        normalized: bool = True,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 32768,
        chunk_rows: int = 8192,
        seed: int = 0,
        val_rows: int = 0,
        max_bad_fraction: float = 0.05,
        min_samples_for_abort: int = 200,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        image_size: int | None = None,
    ) -> None:
        """`image_size` is unused (the folder holds no images); it is accepted so that configs
        which set it for image stages still compose, and then fail on the fields, naming the join
        tool, instead of on an unknown key."""
        super().__init__()
        check_data_values(
            {
                "embed_dim": embed_dim,
                "batch_size": batch_size,
                "val_batch_size": val_batch_size or 1,
                "chunk_rows": chunk_rows,
            },
            {
                "num_workers": num_workers,
                "shuffle_buffer": shuffle_buffer,
                "val_rows": val_rows,
                "min_samples_for_abort": min_samples_for_abort,
            },
            max_bad_fraction,
        )
        self.fields = check_fields(fields)
        absent = [f for f in self.fields if f not in EMBEDDING_ROW_FIELDS]
        if absent:
            raise ValueError(
                f"data=embeddings holds {list(EMBEDDING_ROW_FIELDS)}, not {absent}: to train a "
                f"stage on images, join the embeddings to their images' shards with "
                f"`python -m unclip.data.join` and use data=webdataset"
            )
        self.root, self.name, self.clip = str(root), name, clip
        self.embed_dim, self.normalized = int(embed_dim), bool(normalized)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.chunk_rows = (
            num_workers,
            shuffle_buffer,
            chunk_rows,
        )
        self.seed, self.val_rows = seed, val_rows
        self.max_bad_fraction, self.min_samples_for_abort = max_bad_fraction, min_samples_for_abort
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.rank, self.world_size = 0, 1
        self.val_dataset: RowsDataset | None = None
        self._partitions: list[Partition] | None = None

    # ---- the folder and its facts ----------------------------------------------------------
    @property
    def partitions(self) -> list[Partition]:
        """Every partition, checked against data.embed_dim / data.normalized (read once)."""
        if self._partitions is None:
            self._partitions = find_partitions(
                self.root, self.embed_dim, normalized=self.normalized, config_key="data.root"
            )
            total = sum(p.rows for p in self._partitions)
            if total <= self.val_rows:
                raise ValueError(f"data.val_rows={self.val_rows} but data.root holds {total} rows")
            log.info("%s: %d partitions, %d rows", self.root, len(self._partitions), total)
        return self._partitions

    @property
    def meta(self) -> dict[str, Any]:
        """What a shard set's meta.json says, from the config (the folder itself records none)."""
        dtype = self.partitions[0].dtype if self._partitions else None
        return {
            "clip": self.clip,
            "embed_dim": self.embed_dim,
            "normalized": self.normalized,
            "dtype": dtype,
        }

    def check_embed_dim(self, expected: int, config_key: str) -> None:
        """Fail at start-up, naming both, when the model consumes another embedding size; then
        check every partition's files against data.embed_dim."""
        if self.embed_dim != expected:
            raise ValueError(
                f"data.embed_dim={self.embed_dim} (CLIP {self.clip!r}, data.root={self.root!r}) but "
                f"{config_key}={expected}: set {config_key}={self.embed_dim}"
            )
        _ = self.partitions

    def _sizes(self) -> tuple[list[int], list[Piece]]:
        return split_off_tail([p.rows for p in self.partitions], self.val_rows)

    def _tracker(self, what: str) -> SkipTracker:
        return SkipTracker(
            f"data.root={self.root!r} ({what})", self.max_bad_fraction, self.min_samples_for_abort
        )

    # ---- Lightning hooks -------------------------------------------------------------------
    def setup(
        self, stage: str | None = None, *, rank: int | None = None, world_size: int | None = None
    ) -> None:
        """Take rank and world size from the trainer (or the arguments, for tests and scripts)."""
        trainer = getattr(self, "trainer", None)
        self.rank = rank if rank is not None else (trainer.global_rank if trainer else 0)
        self.world_size = (
            world_size if world_size is not None else (trainer.world_size if trainer else 1)
        )
        if stage in (None, "fit", "validate") and self.val_rows and self.val_dataset is None:
            self.val_dataset = self._materialise_val()

    def train_stream(self, start_batch: int = 0) -> EmbeddingStream:
        sizes, _ = self._sizes()
        return EmbeddingStream(
            self.partitions,
            sizes,
            self.fields,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            chunk_rows=self.chunk_rows,
            seed=self.seed,
            start_batch=start_batch,
            max_bad_fraction=self.max_bad_fraction,
            min_samples_for_abort=self.min_samples_for_abort,
            source=f"data.root={self.root!r}",
        )

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        if start:
            log.info("rank %d: the embedding stream resumes after %d batches", self.rank, start)
        return DataLoader(
            self.train_stream(start),
            batch_size=None,
            collate_fn=as_is,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches leave the workers as stored (float16 for LAION: half the bytes to
        move); on the device they become the float32 the batch contract promises."""
        for name in ("img_emb", "txt_emb"):
            if isinstance(batch, dict) and name in batch and batch[name].dtype != torch.float32:
                batch[name] = batch[name].float()
        return batch

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_rows:
            return []
        if self.val_dataset is None:
            self.setup("validate")
        return DataLoader(
            self.val_dataset,
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=0,  # rows are in memory already
            collate_fn=Collate(self.fields),
            pin_memory=self.pin_memory,
        )

    def stats_dataloader(self, max_samples: int, batch_size: int | None = None) -> DataLoader:
        """The first `max_samples` training rows in partition order, the same on every rank:
        what a stage fits its statistics on before training (see ShardDataModule)."""
        sizes, _ = self._sizes()
        ranges = [(i, 0, n) for i, n in enumerate(sizes) if n]
        rows = first_rows(self.partitions, ranges, max_samples, self._tracker("statistics"))
        if not rows[0]:
            raise ValueError(f"data.root={self.root!r}: no usable rows to fit statistics on")
        return DataLoader(
            RowsDataset(*rows),
            batch_size=batch_size or self.val_batch_size,
            shuffle=False,
            num_workers=0,
            collate_fn=Collate(self.fields),
        )

    def _materialise_val(self) -> RowsDataset:
        """Every rank holds the same rows, cut to a multiple of the world size so Lightning's
        distributed sampler gives each rank an equal share without duplicates."""
        _, held = self._sizes()
        keys, captions, img, txt = first_rows(
            self.partitions, held, self.val_rows, self._tracker("validation")
        )
        usable = len(keys) - len(keys) % self.world_size
        if usable == 0:
            raise ValueError(
                f"data.val_rows={self.val_rows}: {len(keys)} usable rows for {self.world_size} ranks"
            )
        return RowsDataset(keys[:usable], captions[:usable], img[:usable], txt[:usable])
