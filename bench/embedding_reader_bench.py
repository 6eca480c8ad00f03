"""Reading clip-retrieval embedding folders: our `data=embeddings` stream beside embedding-reader
(what DALLE2-pytorch's prior loader uses), rows/s and resident memory, on one generated partition.

    python bench/embedding_reader_bench.py                       # 1M rows x 768 float16 in /tmp
    python bench/embedding_reader_bench.py --rows 200000 --rounds 2

The partition (img_emb, text_emb: L2-normalised float16; metadata: image_path + caption) is written
under --dir and deleted afterwards (--keep keeps it). Both readers deliver what a prior trains on:
image and text embeddings as float32 plus captions, in batches of --batch-size. Ours: one shuffled
pass of `EmbeddingStream` through a DataLoader with 1 and 2 worker processes. embedding-reader: its
`parquet_npy` reader for image embeddings + captions zipped with its `npy` reader for the text
embeddings, in file order, with 1 and 2 `parallel_pieces` (threads). The readers take turns over
--rounds rounds, each measurement in a fresh process; the table gives each one's median and
spread (min-max). Memory is the resident
memory (PSS) of the process and its workers, sampled every 0.25 s: its peak over the first quarter of the pass
and over the whole pass (memory that grows with the file shows as the second far above the first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from unclip.data.embedding_stream import as_is
from unclip.data.embeddings import EmbeddingDataModule

GIB = 2**30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", default="/tmp/unclip_embedding_bench")
    parser.add_argument("--keep", action="store_true", help="keep the generated partition")
    parser.add_argument("--measure", choices=sorted(READERS), help=argparse.SUPPRESS)
    return parser.parse_args()


def generate(root: Path, rows: int, dim: int, block: int = 50_000) -> None:
    """One partition as clip-retrieval writes it, filled block by block (never all in memory)."""
    rng = np.random.default_rng(0)
    for folder, name in (("img_emb", "img_emb_0000.npy"), ("text_emb", "text_emb_0000.npy")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(root / folder / name, "w+", np.float16, (rows, dim))
        for start in range(0, rows, block):
            x = rng.standard_normal((min(block, rows - start), dim), dtype=np.float32)
            out[start : start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        out.flush()
        del out
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    keys = [f"{k:09d}" for k in range(rows)]
    table = pa.table(
        {"image_path": keys, "caption": [f"a photo of thing number {k}" for k in keys]}
    )
    pq.write_table(table, root / "metadata" / "metadata_0000.parquet")


def pss(process: psutil.Process) -> int:
    """Proportional set size: resident pages, shared ones split between the processes sharing
    them (forked workers share torch's pages with their parent; plain RSS would count them twice)."""
    return process.memory_full_info().pss


class MemorySampler:
    """Peak resident memory (PSS) of this process and its children, overall and up to a mark."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak, self.early_peak = interval, 0, 0
        self._early, self._stop = True, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        me = psutil.Process()
        total = pss(me)
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a worker that just exited
                total += pss(child)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._rss()
            self.peak = max(self.peak, rss)
            if self._early:
                self.early_peak = max(self.early_peak, rss)
            time.sleep(self.interval)

    def mark(self) -> None:
        self._early = False

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def ours(root: Path, args: argparse.Namespace, workers: int) -> Iterator[int]:
    dm = EmbeddingDataModule(
        str(root), fields=["txt", "img_emb", "txt_emb"], embed_dim=args.dim,
        batch_size=args.batch_size, num_workers=workers, val_rows=0, persistent_workers=False,
    )  # fmt: skip
    dm.setup("fit")
    loader = DataLoader(dm.train_stream(), batch_size=None, num_workers=workers, collate_fn=as_is)
    batches = args.rows // args.batch_size  # one pass (the stream itself is endless)
    for _, batch in zip(range(batches), loader, strict=False):
        batch = dm.on_after_batch_transfer(batch, 0)  # float16 -> float32, as Lightning calls it
        assert batch["img_emb"].shape == (args.batch_size, args.dim) and len(batch["txt"])
        assert batch["img_emb"].dtype == batch["txt_emb"].dtype == torch.float32
        yield len(batch["__key__"])


def embedding_reader(root: Path, args: argparse.Namespace, workers: int) -> Iterator[int]:
    from embedding_reader import EmbeddingReader

    images = EmbeddingReader(
        str(root / "img_emb"), file_format="parquet_npy", meta_columns=["caption", "image_path"],
        metadata_folder=str(root / "metadata"),
    )  # fmt: skip
    texts = EmbeddingReader(str(root / "text_emb"), file_format="npy")
    kwargs = dict(batch_size=args.batch_size, parallel_pieces=workers, show_progress=False)
    for (img, meta), (txt, _) in zip(images(**kwargs), texts(**kwargs), strict=True):
        assert img.shape == txt.shape and img.dtype == np.float32 and len(meta["caption"])
        yield len(img)


def measure(reader: Callable, root: Path, args: argparse.Namespace, workers: int) -> dict:
    with MemorySampler() as memory:
        start, rows = time.perf_counter(), 0
        for count in reader(root, args, workers):
            rows += count
            if rows >= args.rows // 4:
                memory.mark()
        seconds = time.perf_counter() - start
    return {"rows_per_s": rows / seconds, "early": memory.early_peak, "peak": memory.peak}


READERS = {"unclip EmbeddingStream": ours, "embedding-reader": embedding_reader}


def measure_in_child(name: str, args: argparse.Namespace, workers: int) -> dict:
    """One measurement in a fresh process, so no reader inherits another's memory or warm-up."""
    command = [
        sys.executable, __file__, "--measure", name, "--workers", str(workers), "--dir", args.dir,
        "--rows", str(args.rows), "--dim", str(args.dim), "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    v = [x / scale for x in values]
    return f"{statistics.median(v):,.{digits}f} ({min(v):,.{digits}f}-{max(v):,.{digits}f})"


def main() -> None:
    args = parse_args()
    root = Path(args.dir)
    if args.measure:
        print(json.dumps(measure(READERS[args.measure], root, args, args.workers[0])))
        return
    if root.exists():
        shutil.rmtree(root)
    try:
        start = time.perf_counter()
        generate(root, args.rows, args.dim)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        print(f"generated {args.rows} x {args.dim} float16 ({size / GIB:.2f} GiB on disk) "
              f"in {time.perf_counter() - start:.0f} s")  # fmt: skip
        print(f"a process before reading (torch, pyarrow imported): "
              f"{pss(psutil.Process()) / GIB:.2f} GiB")  # fmt: skip
        results: dict[tuple[str, int], list[dict]] = {}
        for number in range(1, args.rounds + 1):
            for workers in args.workers:
                for name in READERS:
                    result = measure_in_child(name, args, workers)
                    results.setdefault((name, workers), []).append(result)
                    print(f"round {number}: {name}, {workers} worker(s): "
                          f"{result['rows_per_s']:,.0f} rows/s, peak {result['peak'] / GIB:.2f} GiB")  # fmt: skip
        print(f"\n{args.rows} rows x {args.dim}, batch {args.batch_size}, {args.rounds} rounds: "
              "median (min-max)\n")  # fmt: skip
        print(
            "| reader | workers | rows/s | PSS peak, first 25% (GiB) | PSS peak, whole pass (GiB) |"
        )
        print("| --- | ---: | ---: | ---: | ---: |")
        for (name, workers), runs in results.items():
            print(
                f"| {name} | {workers} | {spread([r['rows_per_s'] for r in runs])} | "
                f"{spread([r['early'] for r in runs], GIB, 2)} | "
                f"{spread([r['peak'] for r in runs], GIB, 2)} |"
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
