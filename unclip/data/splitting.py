"""Which shards a rank and a DataLoader worker read.

webdataset's default node splitter raises under more than one rank, and `split_by_node` reads
`torch.distributed` inside workers, where spawned workers see no process group and every rank
silently reads every shard. So rank and world size are taken from the trainer in `setup()` and
carried by a plain, picklable object into the workers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)


class RankSplitter:
    """A strided share of the shard list for one rank; picklable, so it survives spawned workers."""

    def __init__(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank = rank
        self.world_size = world_size

    def __call__(self, urls: Sequence[str]) -> list[str]:
        if len(urls) < self.world_size:
            # a rank without shards would stall the others; resampling keeps streams apart instead
            if self.rank == 0:
                log.warning(
                    "%d shards for %d ranks: every rank reads all shards and keeps its own share of "
                    "their samples (each rank decompresses them all); write at least as many "
                    "shards as ranks x workers",
                    len(urls),
                    self.world_size,
                )
            return list(urls)
        return list(urls[self.rank :: self.world_size])

    def __repr__(self) -> str:
        return f"RankSplitter(rank={self.rank}, world_size={self.world_size})"


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def split_by_worker(urls: Sequence[str], worker: int, num_workers: int) -> list[str]:
    """A strided share of a rank's shards for one worker; every worker keeps all shards when there
    are fewer shards than workers (webdataset would raise "No samples found" instead), and
    `sample_share` then gives each its own samples of them."""
    if len(urls) < num_workers:
        return list(urls)
    return list(urls[worker::num_workers])


def sample_share(
    rank: int | None, world_size: int, worker: int | None, num_workers: int
) -> tuple[int, int]:
    """`(n, i)`: keep the samples whose index in their shard is i modulo n. A rank (or a worker)
    that shares all its shards with the others (`rank`/`worker` given, else None) takes every
    n-th sample, so no two streams read the same samples."""
    stride, offset = 1, 0
    if rank is not None:
        stride, offset = world_size, rank
    if worker is not None:
        stride, offset = stride * num_workers, offset * num_workers + worker
    return stride, offset


def contiguous_share(
    urls: Sequence[str], sizes: Sequence[int], stream: int, num_streams: int
) -> list[dict[str, Any]]:
    """Stream `stream`'s equal share of all samples when shard sizes are known: the shards laid
    end to end and cut into `num_streams` equal ranges, each piece `{"url", "range": (a, b)}` (the
    samples a..b-1 of that shard). Every rank and worker yields batches at the same rate, so only
    equal totals per stream see every sample equally often: a strided split of shards of uneven
    sizes (50 / 400 / 1500 over 2 ranks x 2 workers) shows the small shard's samples 9.75x as often
    as their fair share. A shard cut between streams is read by each, which keeps its own range."""
    total = sum(sizes)
    if total < num_streams:
        raise ValueError(
            f"{total} training samples for {num_streams} streams (ranks x data.num_workers)"
        )
    low, high = total * stream // num_streams, total * (stream + 1) // num_streams
    pieces, start = [], 0
    for url, size in zip(urls, sizes, strict=True):
        a, b = max(low, start), min(high, start + size)
        if a < b:
            pieces.append({"url": url, "range": (a - start, b - start)})
        start += size
    return pieces


def resampled_shards(
    shards: Sequence[dict[str, Any]], rng: random.Random
) -> Iterator[dict[str, Any]]:
    """An endless stream of shards (or shard pieces) drawn uniformly with replacement, each read
    whole, so every sample of the stream is seen equally often: every rank and worker yields
    batches for as long as the trainer asks, so DDP ranks never wait on each other."""
    if not shards:
        raise ValueError("no shards to resample from")
    while True:
        yield dict(rng.choice(shards))
