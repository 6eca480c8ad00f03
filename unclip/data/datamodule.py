"""`ShardDataModule`: WebDataset shards in, batches of the fields a stage asked for out.

Training reads an endless resampled stream split across ranks by an explicit splitter built from
the trainer in `setup()`; validation is materialised (at most `val_max_samples`) and sharded by
Lightning's distributed sampler. See docs/architecture.md for the batch contract.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from unclip.data.decoding import SampleDecoder, SkipTracker
from unclip.data.format import META_FILE, check_fields, read_meta
from unclip.data.shards import expand_shards, shard_dir, shard_name
from unclip.data.splitting import RankSplitter
from unclip.data.streams import (
    Collate,
    EpochLoader,
    MaterialisedDataset,
    ShardStream,
    as_is,
    materialise,
)
from unclip.data.values import check_data_values

log = logging.getLogger(__name__)


class ShardDataModule(L.LightningDataModule):
    """Batches from image-caption(-embedding) shards; every argument is a `data.*` config key."""

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        fields: list[str] | None = None,
        name: str = "shards",
        image_size: int = 64,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        val_max_samples: int = 1000,
        max_bad_fraction: float = 0.05,
        min_samples_for_abort: int = 200,
        meta_path: str | None = None,
        train_batches_per_epoch: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        check_data_values(
            {
                "image_size": image_size,
                "batch_size": batch_size,
                "val_batch_size": val_batch_size or 1,
                "train_batches_per_epoch": train_batches_per_epoch or 1,
            },
            {
                "num_workers": num_workers,
                "shuffle_buffer": shuffle_buffer,
                "val_max_samples": val_max_samples,
                "min_samples_for_abort": min_samples_for_abort,
            },
            max_bad_fraction,
        )
        self.name = name
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.fields = check_fields(fields)
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.val_max_samples = val_max_samples
        self.max_bad_fraction = max_bad_fraction
        self.min_samples_for_abort = min_samples_for_abort
        self.meta_path = meta_path
        self.train_batches_per_epoch = train_batches_per_epoch
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.splitter: RankSplitter | None = None
        self.train_urls: list[str] | None = None
        self.val_dataset: MaterialisedDataset | None = None
        self._expected_dim: int | None = None
        self._meta: dict[str, Any] | None = None
        self._meta_file: Path | None = None
        self._startup_skipped = 0  # bad samples met while reading validation and statistics data

    # ---- the sidecar -----------------------------------------------------------------------
    @property
    def meta_file(self) -> Path | None:
        """Where the sidecar is (or would be): `data.meta_path`, else beside the training shards."""
        if self._meta_file is None:
            if self.meta_path is not None:
                self._meta_file = Path(self.meta_path)
                if self._meta_file.is_dir():
                    self._meta_file = self._meta_file / META_FILE
                if not self._meta_file.is_file():
                    raise FileNotFoundError(f"data.meta_path={self.meta_path!r} does not exist")
            else:
                folder = shard_dir(self._train_urls())
                self._meta_file = folder / META_FILE if folder is not None else None
        return self._meta_file

    @property
    def meta(self) -> dict[str, Any] | None:
        """The shard set's `meta.json` (which CLIP, which size, normalised or not), if it has one."""
        if self._meta is None and self.meta_file is not None:
            self._meta = read_meta(self.meta_file)
        return self._meta

    @property
    def embed_dim(self) -> int | None:
        """The CLIP embedding size recorded in meta.json; None when there is no sidecar."""
        meta = self.meta
        return None if meta is None or meta.get("embed_dim") is None else int(meta["embed_dim"])

    def shard_sizes(self, urls: list[str]) -> dict[str, int] | None:
        """Samples per shard file name, from meta.json's `splits.*.shards.*.samples` (what the
        embed tool records), when it knows every shard of `urls`; else None."""
        sizes = {
            name: int(entry["samples"])
            for split in ((self.meta or {}).get("splits") or {}).values()
            if isinstance(split, dict)
            for name, entry in (split.get("shards") or {}).items()
            if isinstance(entry, dict) and isinstance(entry.get("samples"), int)
        }
        if sizes and all(shard_name(url) in sizes for url in urls):
            return sizes
        return None

    def take_startup_skipped(self) -> int:
        """Bad samples met outside the training stream (validation, statistics) since the last
        call. Every rank reads the same ones, so only one rank should add them to a total."""
        count, self._startup_skipped = self._startup_skipped, 0
        return count

    def check_embed_dim(self, expected: int, config_key: str) -> None:
        """Fail at start-up, naming both sides, when the shards were embedded by a CLIP of another
        size than the model consumes. Without a sidecar, samples are held to `expected` instead."""
        found = self.embed_dim
        if found is not None and found != expected:
            clip = (self.meta or {}).get("clip", "?")
            raise ValueError(
                f"{self.meta_file} says the shards hold embed_dim={found} embeddings (CLIP {clip!r}) "
                f"but {config_key}={expected}: set {config_key}={found} or embed the shards with a "
                f"CLIP of size {expected}"
            )
        self._expected_dim = expected

    # ---- Lightning hooks -------------------------------------------------------------------
    def setup(
        self, stage: str | None = None, *, rank: int | None = None, world_size: int | None = None
    ) -> None:
        """Take rank and world size from the trainer (or the arguments, for tests and scripts)."""
        trainer = getattr(self, "trainer", None)
        if rank is None:
            rank = trainer.global_rank if trainer is not None else 0
        if world_size is None:
            world_size = trainer.world_size if trainer is not None else 1
        self.splitter = RankSplitter(rank, world_size)
        if stage in (None, "fit"):
            self._train_urls()
        if stage in (None, "fit", "validate") and self.val_shards and self.val_dataset is None:
            self.val_dataset = self._materialise_val(world_size)

    def train_dataloader(self) -> DataLoader:
        if self.splitter is None:
            self.setup("fit")
        trainer = getattr(self, "trainer", None)
        urls = self._train_urls()
        sizes = self.shard_sizes(urls)
        if sizes is None and self.splitter.rank == 0:
            log.warning(
                "data.train_shards: no per-shard sample counts in %s; shards are drawn uniformly "
                "from shares split by position, so with uneven shard sizes some samples are seen "
                "more often than others (the embed tool writes the counts)",
                self.meta_file or "a meta.json beside them",
            )
        stream = ShardStream(
            urls,
            self.splitter,
            self._decoder(),
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            start_step=trainer.global_step if trainer is not None else 0,
            max_bad_fraction=self.max_bad_fraction,
            min_samples_for_abort=self.min_samples_for_abort,
            source=f"data.train_shards={self.train_shards!r}",
            batches_per_epoch=self.train_batches_per_epoch,
            shard_sizes=sizes,
        )
        return EpochLoader(
            stream,
            batch_size=None,
            collate_fn=as_is,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            if not self.val_shards:
                return []
            self.setup("validate")
        return DataLoader(
            self.val_dataset,
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=Collate(self.fields),
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def stats_dataloader(self, max_samples: int, batch_size: int | None = None) -> DataLoader:
        """A finite, deterministic pass over the first `max_samples` training samples, in shard
        order and identical on every rank: what a stage fits its statistics on before training
        (embedding mean/std, PCA, quantiser edges), so every rank fits the same ones."""
        source = f"data.train_shards={self.train_shards!r}"
        tracker = SkipTracker(source, self.max_bad_fraction, self.min_samples_for_abort)
        decoder = self._decoder()
        urls = self._train_urls()
        samples = materialise(urls, decoder, max_samples, tracker, self.shard_sizes(urls))
        self._startup_skipped += tracker.bad
        if not samples:
            raise ValueError(f"{source}: no usable samples to fit statistics on")
        return DataLoader(
            MaterialisedDataset(samples, decoder),
            batch_size=batch_size or self.val_batch_size,
            shuffle=False,
            num_workers=0,
            collate_fn=Collate(self.fields),
        )

    # ---- helpers ---------------------------------------------------------------------------
    def _train_urls(self) -> list[str]:
        if self.train_urls is None:
            self.train_urls = expand_shards(self.train_shards, "data.train_shards")
        return self.train_urls

    def _decoder(self) -> SampleDecoder:
        return SampleDecoder(self.fields, self.image_size, self.embed_dim or self._expected_dim)

    def _materialise_val(self, world_size: int) -> MaterialisedDataset:
        """Every rank reads the same list; its length is cut to a multiple of the world size so the
        distributed sampler neither pads with duplicates nor gives ranks unequal batch counts."""
        source = f"data.val_shards={self.val_shards!r}"
        urls = expand_shards(self.val_shards, "data.val_shards")
        tracker = SkipTracker(source, self.max_bad_fraction, self.min_samples_for_abort)
        decoder = self._decoder()
        samples = materialise(urls, decoder, self.val_max_samples, tracker, self.shard_sizes(urls))
        self._startup_skipped += tracker.bad
        usable = len(samples) - len(samples) % world_size
        if usable == 0:
            raise ValueError(f"{source}: {len(samples)} usable samples for {world_size} ranks")
        if usable < len(samples):
            log.info(
                "validation: %d of %d samples (a multiple of %d ranks)",
                usable,
                len(samples),
                world_size,
            )
        return MaterialisedDataset(samples[:usable], decoder)
