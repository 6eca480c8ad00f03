"""Attach precomputed CLIP embeddings (clip-retrieval's / LAION's folders) to img2dataset shards.

    python -m unclip.data.join --shards 'imgs/{00000..00099}.tar' --embeddings DIR --out DIR2

The parquet's `image_path` is the webdataset key (a path or extension around it is dropped), so
rows are matched by key, never by position: partitions follow no tar order. Each input shard
becomes `<split>-NNNNNN.tar` in `--out` holding the samples that have an embedding row: the image
bytes copied through, the caption (the parquet's when the shard has none), the json and
`img_emb.npy` / `txt_emb.npy` as stored. `meta.json` beside them records the CLIP and its size, so
`data=webdataset data.train_shards='DIR2/train-*.tar'` trains the decoder. Shard keys without a
row, rows whose key is in no shard, and keys found twice on either side are printed and written to
`join_report.json`; of a duplicate the first occurrence is kept. The key index is held in memory
(about 100 bytes a row): point --embeddings at the partitions that cover your shards, not at all
of LAION.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from unclip.data.decoding import SkipTracker
from unclip.data.embed import _open_meta
from unclip.data.embedding_folder import (
    CAPTION_COLUMN,
    KEY_COLUMN,
    Partition,
    find_partitions,
    open_array,
    read_metadata,
)
from unclip.data.format import IMAGE_EXTENSIONS, META_FILE, embedding_meta, write_json_atomic
from unclip.data.shards import expand_shards, in_order, raw_samples
from unclip.data.writer import AtomicShardWriter

log = logging.getLogger(__name__)

READ_FIELDS = ("image", "txt", "json")
REPORT_FILE = "join_report.json"
SHOWN = 10  # keys printed per list; the report file holds all of them


def key_of(image_path: str) -> str:
    """The webdataset key an `image_path` names: its file name up to the first dot."""
    return Path(str(image_path)).name.split(".", 1)[0]


class EmbeddingIndex:
    """key -> (partition, row) over every partition, with the keys found more than once."""

    def __init__(self, partitions: list[Partition]) -> None:
        self.partitions = partitions
        self.where: dict[str, tuple[int, int]] = {}
        self.duplicates: dict[str, list[str]] = defaultdict(list)
        self.captions = []
        for index, part in enumerate(partitions):
            table = read_metadata(part, (KEY_COLUMN, CAPTION_COLUMN))
            self.captions.append(table.column(CAPTION_COLUMN))
            for row, path in enumerate(table.column(KEY_COLUMN).to_pylist()):
                if path is None:
                    continue
                key = key_of(path)
                if key in self.where:
                    if key not in self.duplicates:
                        self.duplicates[key].append(self.location(*self.where[key]))
                    self.duplicates[key].append(self.location(index, row))
                    continue
                self.where[key] = (index, row)
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def location(self, index: int, row: int) -> str:
        return f"metadata_{self.partitions[index].name}.parquet row {row}"

    def row(self, key: str) -> tuple[np.ndarray, np.ndarray, str | None] | None:
        """(img_emb, txt_emb, caption) of a key, or None when no partition holds it."""
        if key not in self.where:
            return None
        index, row = self.where[key]
        if index not in self._arrays:
            part = self.partitions[index]
            self._arrays[index] = (open_array(part.img), open_array(part.txt))
        img, txt = self._arrays[index]
        return np.asarray(img[row]), np.asarray(txt[row]), self.captions[index][row].as_py()


def _usable(
    raw: dict[str, Any], found: tuple | None, tracker: SkipTracker
) -> dict[str, Any] | None:
    """The sample to write, or None (skipped and counted) when it cannot train the decoder."""
    url, key = raw.get("__url__", "?"), raw["__key__"]
    img, txt, caption = found
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    text = raw["txt"].decode("utf-8", errors="replace").strip() if "txt" in raw else caption
    if ext is None or text is None:
        tracker.skip(url, key, "needs an image (jpg/png/webp) and a caption")
        return None
    if not (np.isfinite(img).all() and np.isfinite(txt).all()):
        tracker.skip(url, key, "its embedding row holds NaN or inf")
        return None
    tracker.ok()
    sample = {"__key__": key, ext: raw[ext], "txt": text, "img_emb": img, "txt_emb": txt}
    if "json" in raw:
        sample["json"] = raw["json"]
    return sample


def join_shards(
    shards: str | list[str],
    embeddings: str | Path,
    out: str | Path,
    *,
    clip: str = "unknown",
    normalized: bool = True,
    split_name: str = "train",
    max_bad_fraction: float = 0.05,
    min_samples_for_abort: int = 200,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the joined shards and meta.json; returns (and writes) the join report."""
    if "." in split_name or "/" in split_name:
        raise ValueError(f"--split-name must hold no dots or slashes, got {split_name!r}")
    urls = expand_shards(shards, "--shards")
    partitions = find_partitions(embeddings, normalized=normalized, config_key="--embeddings")
    index = EmbeddingIndex(partitions)
    out = Path(out)
    meta = _open_meta(
        out,
        embedding_meta(clip, partitions[0].dim, normalized=normalized, dtype=partitions[0].dtype),
    )
    split = meta["splits"].setdefault(split_name, {"shards": {}})
    split.update(
        input=shards if isinstance(shards, str) else list(shards),
        embeddings=str(embeddings),
        pattern=f"{split_name}-{{000000..{len(urls) - 1:06d}}}.tar",
        num_shards=len(urls),
    )
    tracker = SkipTracker(f"--shards {shards!r}", max_bad_fraction, min_samples_for_abort)
    seen: dict[str, str] = {}
    missing_embeddings: list[str] = []
    duplicate_shard_keys: dict[str, list[str]] = defaultdict(list)
    with tqdm(total=len(urls), desc="joining", unit="shard", disable=not progress) as bar:
        for number, url in enumerate(urls):
            name = f"{split_name}-{number:06d}.tar"
            bad_before, written = tracker.bad, 0
            with AtomicShardWriter(out / name, embed_dtype=partitions[0].dtype) as writer:
                for raw in raw_samples(in_order([url]), READ_FIELDS, tracker):
                    key = raw["__key__"]
                    if key in seen:
                        duplicate_shard_keys[key] = duplicate_shard_keys[key] or [seen[key]]
                        duplicate_shard_keys[key].append(url)
                        continue
                    seen[key] = url
                    found = index.row(key)
                    if found is None:
                        missing_embeddings.append(key)
                        continue
                    sample = _usable(raw, found, tracker)
                    if sample is not None:
                        writer.write(sample)
                        written += 1
            split["shards"][name] = {
                "source": url,
                "samples": written,
                "skipped": tracker.bad - bad_before,
            }
            bar.update(1)
    split["samples"] = sum(s["samples"] for s in split["shards"].values())
    write_json_atomic(out / META_FILE, meta)
    report = {
        "joined": split["samples"],
        "shards": len(urls),
        "rows": sum(p.rows for p in partitions),
        "skipped": tracker.bad,
        "missing_embeddings": missing_embeddings,
        "missing_images": sorted(set(index.where) - set(seen)),
        "duplicate_embeddings": dict(index.duplicates),
        "duplicate_shard_keys": dict(duplicate_shard_keys),
    }
    write_json_atomic(out / f"{split_name}_{REPORT_FILE}", report)
    print_report(report, out / f"{split_name}_{REPORT_FILE}")
    return report


def print_report(report: dict[str, Any], path: Path) -> None:
    print(
        f"joined {report['joined']} samples from {report['shards']} shards and {report['rows']} "
        f"embedding rows ({report['skipped']} samples skipped as unusable)"
    )
    for name, what in (
        ("missing_embeddings", "shard keys with no embedding row"),
        ("missing_images", "embedding keys in no shard"),
        ("duplicate_embeddings", "keys in more than one embedding row (first kept)"),
        ("duplicate_shard_keys", "keys in more than one shard sample (first kept)"),
    ):
        items = report[name]
        if items:
            shown = list(items)[:SHOWN]
            more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
            print(f"  {len(items)} {what}: {', '.join(shown)}{more}")
    print(f"full report: {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", required=True, help="img2dataset shards: brace pattern, glob")
    parser.add_argument(
        "--embeddings", required=True, help="folder with img_emb/ text_emb/ metadata/"
    )
    parser.add_argument("--out", required=True, help="folder for the joined shards + meta.json")
    parser.add_argument("--clip", default="unknown", help="the CLIP that made the embeddings")
    parser.add_argument(
        "--not-normalized", action="store_true", help="the embeddings are not unit vectors"
    )
    parser.add_argument("--split-name", default="train", help="output shards are SPLIT-NNNNNN.tar")
    parser.add_argument("--max-bad-fraction", type=float, default=0.05)
    parser.add_argument("--min-samples-for-abort", type=int, default=200)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        join_shards(
            args.shards,
            args.embeddings,
            args.out,
            clip=args.clip,
            normalized=not args.not_normalized,
            split_name=args.split_name,
            max_bad_fraction=args.max_bad_fraction,
            min_samples_for_abort=args.min_samples_for_abort,
        )
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main(sys.argv[1:])
