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
                    "%d shards for %d ranks: every rank resamples from all shards; write at least "
                    "as many shards as ranks x workers",
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
    are fewer shards than workers (webdataset would raise "No samples found" instead)."""
    if len(urls) < num_workers:
        return list(urls)
    return list(urls[worker::num_workers])


def resampled_shards(urls: Sequence[str], rng: random.Random) -> Iterator[dict[str, str]]:
    """An endless stream of shards drawn with replacement: every rank and worker yields batches for
    as long as the trainer asks, whatever the shard sizes, so DDP ranks never wait on each other."""
    if not urls:
        raise ValueError("no shards to resample from")
    while True:
        yield {"url": rng.choice(urls)}
