"""Batches of prior training rows from clip-retrieval embedding partitions, with no tar at all.

Rows are cut into chunks (contiguous ranges inside one partition, `chunk_rows` long). Pass p (one
trip through the data) permutes the chunk list with a seed of (seed, p), the same on every rank,
and deals it out: chunk j goes to slot j mod (ranks x workers), slot = worker x ranks + rank, so
ranks and workers read disjoint rows that together cover the data once per pass. A worker reads its
chunks partition by partition (partitions in its own random order, so each partition's metadata is
decoded about once a pass), cuts them into windows of `shuffle_buffer` rows and yields each window's
rows in a random order: a shuffle buffer whose contents are known without reading them.

Everything above is a function of (seed, pass, slot, window), so the row a worker yields at
position n can be found without reading the rows before it: that is how a resumed run carries on
(see `RowPlan.locate`). Rows with NaN/inf embeddings or no key/caption are skipped and counted by
the same `SkipTracker` as corrupt shard samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from unclip.data.decoding import DataError, SkipTracker
from unclip.data.embedding_folder import MetadataCache, Partition, copy_embeddings
from unclip.data.splitting import worker_info

Piece = tuple[int, int, int]  # (partition index, first row, end row)


def split_rows(sizes: Sequence[int], chunk_rows: int) -> list[Piece]:
    """Chunks of at most `chunk_rows` rows, never crossing a partition's end."""
    return [
        (index, start, min(start + chunk_rows, size))
        for index, size in enumerate(sizes)
        for start in range(0, size, chunk_rows)
    ]


def rows_in(pieces: Sequence[Piece]) -> int:
    return sum(stop - start for _, start, stop in pieces)


def cut_windows(pieces: Sequence[Piece], window_rows: int) -> list[list[Piece]]:
    """Consecutive windows of exactly `window_rows` rows (the last may be shorter)."""
    windows: list[list[Piece]] = [[]]
    room = window_rows
    for index, start, stop in pieces:
        while start < stop:
            take = min(room, stop - start)
            windows[-1].append((index, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                windows.append([])
                room = window_rows
    return [w for w in windows if w]


class RowPlan:
    """Which rows one slot (a worker of a rank) reads, in which order, pass after pass."""

    def __init__(
        self,
        sizes: Sequence[int],
        chunk_rows: int,
        *,
        slot: int,
        num_slots: int,
        seed: int,
        shuffle_buffer: int,
    ) -> None:
        total = sum(sizes)
        if total < num_slots:
            raise DataError(
                f"{total} training rows for {num_slots} readers (ranks x workers): every reader "
                f"needs at least one row"
            )
        # enough chunks that no slot is left without one
        self.chunks = split_rows(sizes, max(1, min(chunk_rows, total // num_slots)))
        self.num_partitions = len(sizes)
        self.slot, self.num_slots, self.seed = slot, num_slots, seed
        self.shuffle = shuffle_buffer > 1
        self.window_rows = shuffle_buffer if self.shuffle else max(1, chunk_rows)

    def pass_pieces(self, epoch: int) -> list[Piece]:
        """This slot's chunks of pass `epoch`, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        mine = order[self.slot :: self.num_slots]
        partition_rank = np.random.default_rng([self.seed, epoch, self.slot]).permutation(
            self.num_partitions
        )
        mine = sorted(
            mine, key=lambda j: partition_rank[self.chunks[j][0]]
        )  # stable: random within
        return [self.chunks[j] for j in mine]

    def windows(self, epoch: int) -> list[list[Piece]]:
        return cut_windows(self.pass_pieces(epoch), self.window_rows)

    def window_order(self, epoch: int, window: int, rows: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(rows)
        return np.random.default_rng([self.seed, epoch, self.slot, window]).permutation(rows)

    def locate(self, position: int) -> tuple[int, int, int]:
        """(pass, window, offset in the shuffled window) of the row this slot reads at `position`.
        Computed from chunk sizes alone: resuming at step 100k reads no row before it."""
        epoch = 0
        while position >= (rows := rows_in(self.pass_pieces(epoch))):
            position -= rows
            epoch += 1
        return epoch, position // self.window_rows, position % self.window_rows


class Batcher:
    """Full batches of the contract's keys out of filtered window rows. Embeddings stay as stored
    (float16 for LAION): half the bytes through the worker queue; `EmbeddingDataModule` makes them
    float32 after the batch reached its device."""

    def __init__(self, fields: Sequence[str], batch_size: int, tracker: SkipTracker) -> None:
        self.fields, self.batch_size, self.tracker = tuple(fields), batch_size, tracker
        self._parts: list[tuple[list, list, np.ndarray, np.ndarray]] = []
        self._count = 0

    def add(self, keys: list, captions: list, img: np.ndarray, txt: np.ndarray) -> Iterator[dict]:
        self._parts.append((keys, captions, img, txt))
        self._count += len(keys)
        while self._count >= self.batch_size:
            yield self._batch(*self._take(self.batch_size))

    def _take(self, rows: int) -> tuple[list, list, np.ndarray, np.ndarray]:
        """The first `rows` buffered rows: views of one window when they lie in one (most
        batches), a copy of just those rows when they straddle two."""
        taken: list[tuple[list, list, np.ndarray, np.ndarray]] = []
        while rows:
            keys, captions, img, txt = self._parts[0]
            n = min(rows, len(keys))
            taken.append((keys[:n], captions[:n], img[:n], txt[:n]))
            if n == len(keys):
                self._parts.pop(0)
            else:
                self._parts[0] = (keys[n:], captions[n:], img[n:], txt[n:])
            rows -= n
            self._count -= n
        if len(taken) == 1:
            return taken[0]
        return (
            [k for part in taken for k in part[0]],
            [c for part in taken for c in part[1]],
            np.concatenate([part[2] for part in taken]),
            np.concatenate([part[3] for part in taken]),
        )

    def _batch(self, keys: list, captions: list, img: np.ndarray, txt: np.ndarray) -> dict:
        batch: dict[str, Any] = {"__key__": keys}
        if "txt" in self.fields:
            batch["txt"] = captions
        if "img_emb" in self.fields:
            batch["img_emb"] = torch.from_numpy(img)
        if "txt_emb" in self.fields:
            batch["txt_emb"] = torch.from_numpy(txt)
        batch["skipped"] = torch.tensor(self.tracker.take_skipped(), dtype=torch.long)
        return batch


def finite_rows(array: np.ndarray) -> np.ndarray:
    """Which rows hold no NaN/inf; float16 by its exponent bits (2x numpy's emulated isfinite)."""
    if array.dtype == np.float16:  # exponent bits all set: inf or NaN
        return (array.view(np.uint16) & 0x7C00).max(axis=1) != 0x7C00
    return np.isfinite(array).all(axis=1)


def read_rows(
    partitions: Sequence[Partition],
    pieces: Sequence[Piece],
    cache: MetadataCache,
    tracker: SkipTracker,
    order: np.ndarray | None = None,
) -> tuple[list, list, np.ndarray, np.ndarray]:
    """The good rows of `pieces` (in `order`, a permutation of their rows, when given): keys,
    captions, image and text embeddings as stored (float16 for LAION: half the bytes to shuffle;
    batches are float32). Bad rows are skipped, named and counted."""
    keys: list = []
    captions: list = []
    rows = rows_in(pieces)
    dtype = np.result_type(*(partitions[i].dtype for i, _, _ in pieces))
    img = np.empty((rows, partitions[pieces[0][0]].dim), dtype)
    txt = np.empty_like(img)
    source = np.empty(rows, np.int64)
    at = 0
    for number, (index, start, stop) in enumerate(pieces):
        part, end = partitions[index], at + stop - start
        copy_embeddings(part, start, stop, img[at:end], txt[at:end])
        piece_keys, piece_captions = cache.rows(part, start, stop)
        keys += piece_keys
        captions += piece_captions
        source[at:end] = number
        at = end
    if order is not None:
        img, txt, source = img[order], txt[order], source[order]
        keys, captions = [keys[i] for i in order], [captions[i] for i in order]
    good = finite_rows(img) & finite_rows(txt)
    good &= np.array([k is not None and c is not None for k, c in zip(keys, captions, strict=True)])
    for row in np.flatnonzero(~good):
        part = partitions[pieces[source[row]][0]]
        finite = np.isfinite(img[row]).all() and np.isfinite(txt[row]).all()
        reason = "no image_path or caption" if finite else "NaN or inf"
        tracker.skip(str(part.img.parent.parent), keys[row], f"partition {part.name}: {reason}")
    tracker.good += int(good.sum())
    if not good.all():
        keep = np.flatnonzero(good)
        img, txt = img[keep], txt[keep]
        keys, captions = [keys[i] for i in keep], [captions[i] for i in keep]
    return keys, [c.strip() for c in captions], img, txt


def first_rows(
    partitions: Sequence[Partition],
    ranges: Sequence[Piece],
    max_rows: int,
    tracker: SkipTracker,
    chunk_rows: int = 65536,
) -> tuple[list, list, np.ndarray, np.ndarray]:
    """Up to `max_rows` good rows of `ranges`, in order, embeddings as float32: the same on every
    rank (validation and the statistics a stage fits before training)."""
    cache = MetadataCache()
    out: list[tuple[list, list, np.ndarray, np.ndarray]] = []
    held = 0
    for piece in cut_windows(ranges, chunk_rows):
        if held >= max_rows:
            break
        keys, captions, img, txt = read_rows(partitions, piece, cache, tracker)
        out.append((keys, captions, img, txt))
        held += len(keys)
    if not out:
        empty = np.zeros((0, partitions[0].dim), np.float32)
        return [], [], empty, empty
    keys = [k for part in out for k in part[0]][:max_rows]
    captions = [c for part in out for c in part[1]][:max_rows]
    img = np.concatenate([part[2] for part in out])[:max_rows].astype(np.float32)
    txt = np.concatenate([part[3] for part in out])[:max_rows].astype(np.float32)
    return keys, captions, img, txt


class EmbeddingStream(IterableDataset):
    """One rank's endless stream of full batches; see the module docstring for the row order.

    `start_batch` is how many batches this rank has already trained on (global step x gradient
    accumulation). DataLoader workers hand batches out in turn, so worker w of k made
    len(range(w, start_batch, k)) of them: it resumes at that many batches' worth of rows into
    its own order. A new DataLoader starts with its worker 0, so worker ids are rotated by
    start_batch to put the worker due next first. A resumed run thus continues the interrupted
    one's row order; only rows the first run skipped as bad shift it (by that many rows, which
    are then read again). This holds for the same ranks, workers, batch size, chunk_rows and
    shuffle_buffer; with others a run still resumes, in another deal of the rows.
    """

    def __init__(
        self,
        partitions: Sequence[Partition],
        sizes: Sequence[int],
        fields: Sequence[str],
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        shuffle_buffer: int,
        chunk_rows: int,
        seed: int,
        start_batch: int = 0,
        max_bad_fraction: float,
        min_samples_for_abort: int,
        source: str,
    ) -> None:
        super().__init__()
        self.partitions, self.sizes, self.fields = list(partitions), list(sizes), tuple(fields)
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.shuffle_buffer, self.chunk_rows = (
            batch_size,
            shuffle_buffer,
            chunk_rows,
        )
        self.seed, self.start_batch = seed, start_batch
        self.max_bad_fraction, self.min_samples_for_abort = max_bad_fraction, min_samples_for_abort
        self.source = source

    def plan(self, worker: int, num_workers: int) -> RowPlan:
        return RowPlan(
            self.sizes,
            self.chunk_rows,
            slot=worker * self.world_size + self.rank,
            num_slots=self.world_size * num_workers,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_info()
        # a fresh DataLoader asks worker 0 first: it takes the part of the worker due next
        worker = (worker + self.start_batch) % num_workers
        plan = self.plan(worker, num_workers)
        done = len(range(worker, self.start_batch, num_workers)) * self.batch_size
        epoch, first_window, offset = plan.locate(done)
        tracker = SkipTracker(self.source, self.max_bad_fraction, self.min_samples_for_abort)
        batcher = Batcher(self.fields, self.batch_size, tracker)
        cache = MetadataCache()
        while True:
            windows = plan.windows(epoch)
            for number in range(first_window, len(windows)):
                pieces = windows[number]
                order = plan.window_order(epoch, number, rows_in(pieces))[offset:]
                yield from batcher.add(*read_rows(self.partitions, pieces, cache, tracker, order))
                offset = 0
            epoch, first_window = epoch + 1, 0
