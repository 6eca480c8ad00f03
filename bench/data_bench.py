"""The prior's data path: how fast unclip's shard stream feeds a diffusion prior, beside plain
webdataset on the same shards and beside the rate the prior's training step consumes samples.

    python bench/data_bench.py                      # demo-sized shards (20k samples, 64-d)
    python bench/data_bench.py --samples 50000 --dim 768 --rounds 5

Shards are written by unclip's writer into a temporary folder (`--pax` also writes a copy with the
writer's old float mtime, whose every member carries a PAX record, to show what the plain headers
buy). Every reader gets one DataLoader worker (`--workers`), the prior's fields (caption and the two
embeddings, images never read) and the same shuffle buffer, and is timed from `iter()` (worker
start-up included) to its first batch, then over `--batches` batches. The training rate is
`model=prior_diffusion`'s Lightning training step fed one fixed batch in the main process.
The readers are interleaved over `--rounds` rounds; the table gives median and spread (min-max).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from unclip.data import writer as shard_writer
from unclip.data.datamodule import ShardDataModule
from unclip.data.format import FileSelector

CONF = Path(__file__).resolve().parents[1] / "conf"
FIELDS = ["txt", "img_emb", "txt_emb"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="embedding size (demo CLIP: 64)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=100, help="timed batches per reader")
    parser.add_argument("--shuffle-buffer", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--pax", action="store_true", help="also time shards with PAX headers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    return parser.parse_args()


def write_shards(folder: Path, args: argparse.Namespace, pax: bool) -> list[str]:
    """Shapes-like samples: a 64px PNG with one disc, a caption, two float16 embeddings."""
    saved = dict(shard_writer.TAR_OPTIONS)
    if pax:
        shard_writer.TAR_OPTIONS["mtime"] = 0.0  # the writer's former setting
    rng = np.random.default_rng(0)
    try:
        per_shard = args.samples // args.shards
        with shard_writer.ShardSetWriter(folder, max_count=per_shard) as writer:
            for i in range(per_shard * args.shards):
                image = Image.new("RGB", (64, 64), (240, 240, 240))
                x, y = rng.integers(8, 56, 2)
                ImageDraw.Draw(image).ellipse((x - 8, y - 8, x + 8, y + 8), fill=(200, 30, 30))
                vectors = rng.standard_normal((2, args.dim)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                writer.write(
                    {
                        "__key__": f"{i:09d}",
                        "image": image,
                        "txt": "a red circle",
                        "img_emb": vectors[0],
                        "txt_emb": vectors[1],
                    }
                )
        return writer.shards
    finally:
        shard_writer.TAR_OPTIONS.clear()
        shard_writer.TAR_OPTIONS.update(saved)


def unclip_loader(urls: list[str], args: argparse.Namespace) -> DataLoader:
    data = ShardDataModule(
        train_shards=urls,
        fields=FIELDS,
        batch_size=args.batch_size,
        num_workers=args.workers,
        shuffle_buffer=args.shuffle_buffer,
        persistent_workers=False,
    )
    data.setup("fit", rank=0, world_size=1)
    return data.train_dataloader()


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def webdataset_loader(urls: list[str], args: argparse.Namespace) -> DataLoader:
    """The plain pipeline a webdataset user writes, given the same member filter as ours."""
    pipeline = (
        wds.WebDataset(
            urls,
            resampled=True,
            shardshuffle=True,
            nodesplitter=None,
            select_files=FileSelector(FIELDS),
        )
        .shuffle(args.shuffle_buffer)
        .to_tuple("txt", "img_emb.npy", "txt_emb.npy")
        .map_tuple(bytes.decode, npy, npy)
        .batched(args.batch_size, partial=False)
    )
    return DataLoader(pipeline, batch_size=None, num_workers=args.workers)


def time_reader(loader: DataLoader, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, samples/s over the next `batches`)."""
    start = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    first_s = time.perf_counter() - start
    size = len(first["__key__"]) if isinstance(first, dict) else len(first[0])
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * size / (time.perf_counter() - start)
    del iterator
    return first_s, rate


class StepClock(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times = warmup, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())


class FixedBatch(ShardDataModule):
    """The prior's statistics are fitted from the shards as usual; training sees one batch again
    and again, so the step is timed without any data loading."""

    def train_dataloader(self) -> DataLoader:
        batch = next(iter(super().train_dataloader()))
        return DataLoader([batch] * 10_000, batch_size=None, num_workers=0)


def training_rate(urls: list[str], args: argparse.Namespace) -> float:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train", overrides=["model=prior_diffusion", f"model.embed_dim={args.dim}"]
        ).model
    model = instantiate(cfg, _convert_="all")
    data = FixedBatch(train_shards=urls, fields=FIELDS, batch_size=args.batch_size, num_workers=0)
    clock = StepClock(warmup=5)
    trainer = L.Trainer(
        max_steps=args.train_steps + clock.warmup,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[clock],
    )
    trainer.fit(model, datamodule=data)
    timed = clock.times[clock.warmup :]
    return (len(timed) - 1) * args.batch_size / (timed[-1] - timed[0])


def summary(values: Iterable[float], fmt: str) -> str:
    values = list(values)
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="unclip-data-bench-") as tmp:
        plain = write_shards(Path(tmp) / "ustar", args, pax=False)
        readers: dict[str, Callable[[], DataLoader]] = {
            "unclip ShardDataModule": lambda: unclip_loader(plain, args),
            "plain webdataset": lambda: webdataset_loader(plain, args),
        }
        sizes = {"ustar": sum(os.path.getsize(u) for u in plain)}
        if args.pax:
            pax = write_shards(Path(tmp) / "pax", args, pax=True)
            sizes["pax"] = sum(os.path.getsize(u) for u in pax)
            readers["unclip, PAX-header shards"] = lambda: unclip_loader(pax, args)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in readers}
        train: list[float] = []
        for round_index in range(args.rounds):
            for name, make in readers.items():
                results[name].append(time_reader(make(), args.batches))
            train.append(training_rate(plain, args))
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    step_rate = statistics.median(train)
    print(
        f"\n{args.samples} samples in {args.shards} shards, dim {args.dim}, batch {args.batch_size}, "
        f"{args.workers} worker(s), shuffle buffer {args.shuffle_buffer}, {args.rounds} rounds; "
        + ", ".join(f"{k} shards {v / 2**20:.1f} MiB" for k, v in sizes.items())
    )
    print(f"{'reader':<28} {'first batch (s)':>22} {'samples/s':>26} {'x training rate':>16}")
    for name, rows in results.items():
        firsts, rates = zip(*rows, strict=True)
        print(
            f"{name:<28} {summary(firsts, '.3f'):>22} {summary(rates, '.0f'):>26} "
            f"{statistics.median(rates) / step_rate:>15.1f}x"
        )
    print(f"{'prior training step':<28} {'':>22} {summary(train, '.0f'):>26} {1.0:>15.1f}x")


if __name__ == "__main__":
    main()
