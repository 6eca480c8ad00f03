"""The two ways batches reach a model.

Training: an endless stream per rank and worker, resampling that rank's shards with a seed made of
(seed, start step, rank, worker, epoch), shuffled in a buffer, decoded, batched without partial
batches. Every rank yields as many batches as the trainer asks for, whatever the shard sizes.

Validation: a small, deterministic list of raw samples read once in the main process, wrapped as a
map-style dataset so Lightning's distributed sampler gives each rank its own share.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset

from unclip.data.decoding import BadSample, DataError, SampleDecoder, SkipTracker
from unclip.data.shards import in_order, raw_samples, shard_name
from unclip.data.splitting import (
    RankSplitter,
    contiguous_share,
    resampled_shards,
    sample_share,
    split_by_worker,
    worker_info,
)

TENSOR_FIELDS = frozenset({"image", "img_emb", "txt_emb"})
# Resampled shard draws without a single sample or error, per shard, before the stream gives up:
# with n shards of which one holds data, 20n draws all miss it with probability about e^-20.
EMPTY_DRAWS_PER_SHARD = 20
# Samples held before the shuffle buffer yields its first one (webdataset's default).
SHUFFLE_INITIAL = 100


def as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's `collate_fn` for ready-made batches: its default (`default_convert`)
    walks every key and caption of every batch, which cost more than reading the rows."""
    return batch


class Collate:
    """Stacks tensors, lists strings and metadata, and reports how many samples were skipped."""

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = tuple(fields)

    def __call__(self, samples: list[dict[str, Any]], skipped: int = 0) -> dict[str, Any]:
        batch: dict[str, Any] = {"__key__": [s["__key__"] for s in samples]}
        for name in self.fields:
            values = [s[name] for s in samples]
            batch[name] = torch.stack(values) if name in TENSOR_FIELDS else values
        batch["skipped"] = torch.tensor(skipped, dtype=torch.long)
        return batch


def shuffled(
    items: Iterator[Any], buffer: int, rng: random.Random, initial: int = SHUFFLE_INITIAL
) -> Iterator[Any]:
    """Shuffle a stream through a buffer of `buffer` items (0 or 1: unshuffled), with webdataset's
    own shuffle: it starts yielding once `initial` items are held and grows the buffer to full size
    as it goes, so the first batch does not wait for the whole buffer to fill."""
    if buffer <= 1:
        return items
    return wds.filters.shuffle(buffer, min(initial, buffer), rng=rng)(items)


def decoded(
    raws: Iterator[dict[str, Any]], decoder: SampleDecoder, tracker: SkipTracker
) -> Iterator[dict[str, Any]]:
    for raw in raws:
        try:
            sample = decoder(raw)
        except BadSample as error:
            tracker.skip(raw.get("__url__", "?"), raw.get("__key__"), str(error))
            continue
        tracker.ok()
        yield sample


def batched(
    samples: Iterator[dict[str, Any]], batch_size: int, collate: Collate, tracker: SkipTracker
) -> Iterator[dict[str, Any]]:
    """Full batches only: equal shapes on every rank, and no short batch at a shard's end."""
    batch: list[dict[str, Any]] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield collate(batch, tracker.take_skipped())
            batch = []


class ShardStream(IterableDataset):
    """An endless, resampled stream of decoded batches from one rank's share of the shards."""

    def __init__(
        self,
        urls: Sequence[str],
        splitter: RankSplitter,
        decoder: SampleDecoder,
        *,
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        start_step: int = 0,
        max_bad_fraction: float,
        min_samples_for_abort: int,
        source: str,
        batches_per_epoch: int | None = None,
        shard_sizes: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.splitter = splitter
        self.all_urls = list(urls)
        # samples per shard file name (meta.json): equal shares of samples, truncation checks
        self.shard_sizes = dict(shard_sizes) if shard_sizes else None
        self.urls = self.all_urls if self.shard_sizes else splitter(urls)
        self.decoder = decoder
        self.collate = Collate(decoder.fields)
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.start_step = start_step  # a resumed run draws new data, not the first steps again
        self.max_bad_fraction = max_bad_fraction
        self.min_samples_for_abort = min_samples_for_abort
        self.source = source
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0  # bumped in the main process by EpochLoader before workers are made
        self._iterations = 0  # bumped in the worker: persistent workers keep their own copy

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an endless training stream has no length; runs use max_steps")
        return self.batches_per_epoch

    def rng(self, worker: int) -> random.Random:
        """A generator unique to this rank, worker and epoch; string seeds hash deterministically."""
        parts = (
            self.seed,
            self.start_step,
            self.splitter.rank,
            worker,
            self.epoch,
            self._iterations,
        )
        return random.Random("/".join(map(str, parts)))

    def shards_of(self, worker: int, num_workers: int) -> list[dict[str, Any]]:
        """The shards (or pieces of shards) one worker of this rank reads. With known sizes, an
        equal share of all samples (`contiguous_share`); else a strided share of the shards,
        streams that must share shards (fewer than ranks or workers) keeping every n-th sample."""
        rank, world = self.splitter.rank, self.splitter.world_size
        if self.shard_sizes:
            sizes = [self.shard_sizes[shard_name(url)] for url in self.all_urls]
            return contiguous_share(
                self.all_urls, sizes, rank * num_workers + worker, world * num_workers
            )
        every = sample_share(
            rank if len(self.all_urls) < world else None,
            world,
            worker if len(self.urls) < num_workers else None,
            num_workers,
        )
        return [
            {"url": url, "every": every} for url in split_by_worker(self.urls, worker, num_workers)
        ]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self.iterate(*worker_info())

    def iterate(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """The batches of one DataLoader worker (`__iter__` asks torch which one it is)."""
        rng = self.rng(worker)
        self._iterations += 1
        pieces = self.shards_of(worker, num_workers)
        tracker = SkipTracker(self.source, self.max_bad_fraction, self.min_samples_for_abort)
        shards = self._give_up_when_empty(resampled_shards(pieces, rng), tracker, len(pieces))
        raws = self._count(
            raw_samples(shards, self.decoder.fields, tracker, self.shard_sizes), tracker
        )
        # shuffle raw bytes, not decoded pixels: the buffer stays small
        samples = decoded(shuffled(raws, self.shuffle_buffer, rng), self.decoder, tracker)
        yield from batched(samples, self.batch_size, self.collate, tracker)

    @staticmethod
    def _count(raws: Iterator[dict[str, Any]], tracker: SkipTracker) -> Iterator[dict[str, Any]]:
        for raw in raws:
            tracker.read += 1
            yield raw

    def _give_up_when_empty(
        self, shards: Iterator[dict[str, str]], tracker: SkipTracker, num_shards: int
    ) -> Iterator[dict[str, str]]:
        """Shards that open fine but hold no sample would otherwise make an endless silent loop."""
        last, idle = -1, 0
        for shard in shards:
            progress = tracker.read + tracker.bad
            idle = idle + 1 if progress == last else 0
            last = progress
            if idle > EMPTY_DRAWS_PER_SHARD * num_shards:
                raise DataError(f"{self.source}: {idle} shards in a row held no sample")
            yield shard


class EpochLoader(DataLoader):
    """A DataLoader over a ShardStream that gives every epoch fresh seeds (non-persistent workers
    would otherwise replay the same shards and shuffles) and, with `batches_per_epoch`, ends an epoch
    after exactly that many batches, counted here in the main process rather than per worker."""

    dataset: ShardStream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.epoch += 1
        batches = super().__iter__()
        limit = self.dataset.batches_per_epoch
        return batches if limit is None else islice(batches, limit)


def materialise(
    urls: Sequence[str],
    decoder: SampleDecoder,
    max_samples: int,
    tracker: SkipTracker,
    expected: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Up to `max_samples` decodable raw samples, read in shard order: the same list on every rank."""
    kept: list[dict[str, Any]] = []
    if max_samples <= 0:
        return kept
    for raw in raw_samples(in_order(urls), decoder.fields, tracker, expected):
        try:
            decoder(raw)
        except BadSample as error:
            tracker.skip(raw.get("__url__", "?"), raw.get("__key__"), str(error))
            continue
        tracker.ok()
        kept.append(raw)
        if len(kept) >= max_samples:
            break
    return kept


class MaterialisedDataset(Dataset):
    """Raw samples held in memory (bytes are smaller than decoded pixels), decoded on access."""

    def __init__(self, samples: list[dict[str, Any]], decoder: SampleDecoder) -> None:
        self.samples = samples
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.decoder(self.samples[index])
