"""Add CLIP embeddings to image-caption shards.

    python -m unclip.data.embed --input 'data/shapes/train-{000000..000015}.tar' \\
        --output data/shapes_emb --clip runs/demo-clip/checkpoints/last.ckpt --split-name train

Reads our shards or img2dataset's (`KEY.jpg`, `KEY.txt`, `KEY.json`) and writes one output shard per
input shard, `<split>-NNNNNN.tar` (NNNNNN: its place in the input list), holding the same keys, the
image bytes copied through, the caption, the json and L2-normalised `img_emb.npy`/`txt_emb.npy` (`--raw`: as the CLIP outputs them).
`meta.json` beside them names the CLIP. Each shard is written under a temporary name and renamed
when complete, and finished shards are skipped: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from unclip.clip import encode_images, encode_texts, load_clip
from unclip.data.decoding import SkipTracker, to_rgb
from unclip.data.format import (
    IMAGE_EXTENSIONS,
    META_FILE,
    embedding_meta,
    read_meta,
    write_json_atomic,
)
from unclip.data.shards import expand_shards, in_order, raw_samples
from unclip.data.writer import EMBED_DTYPES, AtomicShardWriter

log = logging.getLogger(__name__)

READ_FIELDS = ("image", "txt", "json")
MATCHING_META_KEYS = ("clip", "embed_dim", "normalized", "dtype")


def _open_meta(output: Path, new: dict[str, Any]) -> dict[str, Any]:
    """The sidecar to update: a folder already embedded by another CLIP is refused."""
    meta_file = output / META_FILE
    existing = read_meta(meta_file)
    if existing is None:
        return {**new, "splits": {}}
    for key in MATCHING_META_KEYS:
        if existing.get(key) != new[key]:
            raise ValueError(
                f"{meta_file} records {key}={existing.get(key)!r} but this run has {new[key]!r}: "
                f"embed into another --output folder"
            )
    existing.setdefault("splits", {})
    return existing


class ShardEmbedder:
    """Embeds the samples of one input shard batch by batch and writes them to one output shard."""

    def __init__(
        self,
        clip: tuple,
        batch_size: int,
        dtype: str,
        tracker: SkipTracker,
        bar: tqdm,
        normalize: bool = True,
    ) -> None:
        self.model, self.preprocess, self.tokenizer = clip
        self.normalize = normalize
        self.batch_size = batch_size
        self.dtype = dtype
        self.tracker = tracker
        self.bar = bar

    def __call__(self, url: str, path: Path) -> int:
        pending: list[tuple[dict[str, Any], Image.Image, str]] = []
        with AtomicShardWriter(path, embed_dtype=self.dtype) as writer:
            for raw in raw_samples(in_order([url]), READ_FIELDS, self.tracker):
                item = self._read(raw)
                if item is None:
                    continue
                pending.append(item)
                if len(pending) == self.batch_size:
                    self._flush(pending, writer)
                    pending = []
            self._flush(pending, writer)
            return writer.count

    def _read(self, raw: dict[str, Any]) -> tuple[dict[str, Any], Image.Image, str] | None:
        url, key = raw.get("__url__", "?"), raw.get("__key__")
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None or "txt" not in raw:
            self.tracker.skip(url, key, "needs an image (jpg/png/webp) and a txt caption")
            return None
        try:
            with Image.open(io.BytesIO(raw[ext])) as opened:
                opened.load()
                image = to_rgb(opened)
            caption = raw["txt"].decode("utf-8").strip()
        except Exception as error:  # noqa: BLE001 - any undecodable sample is skipped
            self.tracker.skip(url, key, f"{type(error).__name__}: {error}")
            return None
        self.tracker.ok()
        sample = {"__key__": key, ext: raw[ext], "txt": caption}
        if "json" in raw:
            sample["json"] = raw["json"]
        return sample, image, caption

    def _flush(self, pending: list, writer: AtomicShardWriter) -> None:
        if not pending:
            return
        images = [image for _, image, _ in pending]
        captions = [caption for _, _, caption in pending]
        images = encode_images(self.model, self.preprocess, images, normalize=self.normalize)
        texts = encode_texts(self.model, self.tokenizer, captions, normalize=self.normalize)
        for (sample, _, _), img_emb, txt_emb in zip(pending, images, texts, strict=True):
            writer.write({**sample, "img_emb": img_emb, "txt_emb": txt_emb})
        self.bar.update(len(pending))


def embed_shards(
    input: str | list[str],
    output: str | Path,
    clip: str,
    *,
    batch_size: int = 256,
    split_name: str = "train",
    dtype: str = "float16",
    device: str | None = None,
    max_bad_fraction: float = 0.05,
    min_samples_for_abort: int = 200,
    progress: bool = True,
    raw: bool = False,
) -> dict[str, Any]:
    """Embed every input shard not yet embedded; returns the updated `meta.json` contents. `raw`
    stores the CLIP's embeddings as they come (not L2-normalised; meta.json says normalized=false),
    the space of Karlo's prior statistics."""
    if dtype not in EMBED_DTYPES:
        raise ValueError(f"--dtype must be one of {EMBED_DTYPES}, got {dtype!r}")
    if "." in split_name or "/" in split_name:
        raise ValueError(f"--split-name must hold no dots or slashes, got {split_name!r}")
    urls = expand_shards(input, "--input")
    output = Path(output)
    names = [f"{split_name}-{i:06d}.tar" for i in range(len(urls))]
    todo = [
        (url, name) for url, name in zip(urls, names, strict=True) if not (output / name).exists()
    ]
    print(f"{len(urls) - len(todo)} of {len(urls)} shards already embedded in {output}")
    if not todo:
        return read_meta(output / META_FILE) or {}

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, preprocess, tokenizer, info = load_clip(clip, device=device)
    meta = _open_meta(
        output, embedding_meta(clip, info["embed_dim"], normalized=not raw, dtype=dtype)
    )
    split = meta["splits"].setdefault(split_name, {"shards": {}})
    split.update(
        input=input if isinstance(input, str) else list(input),
        pattern=f"{split_name}-{{000000..{len(urls) - 1:06d}}}.tar",
        num_shards=len(urls),
    )
    tracker = SkipTracker(f"--input {input!r}", max_bad_fraction, min_samples_for_abort)
    with tqdm(desc=f"embedding {split_name}", unit="img", disable=not progress) as bar:
        clip_parts = (model, preprocess, tokenizer)
        embedder = ShardEmbedder(clip_parts, batch_size, dtype, tracker, bar, normalize=not raw)
        for number, (url, name) in enumerate(todo, 1):
            bar.set_postfix_str(f"shard {number}/{len(todo)}")
            bad_before = tracker.bad
            count = embedder(url, output / name)
            split["shards"][name] = {
                "source": url,
                "samples": count,
                "skipped": tracker.bad - bad_before,
            }
            split["samples"] = sum(s["samples"] for s in split["shards"].values())
            write_json_atomic(output / META_FILE, meta)
    print(f"embedded {tracker.good} samples ({tracker.bad} skipped) into {output}")
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="shards: brace pattern, glob, list or URL")
    parser.add_argument("--output", required=True, help="folder for embedded shards + meta.json")
    parser.add_argument("--clip", required=True, help="CLIP spec (see unclip.clip.load_clip)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--split-name", default="train", help="output shards are SPLIT-NNNNNN.tar")
    parser.add_argument("--dtype", default="float16", choices=EMBED_DTYPES)
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--max-bad-fraction", type=float, default=0.05)
    parser.add_argument("--min-samples-for-abort", type=int, default=200)
    parser.add_argument(
        "--raw",
        action="store_true",
        help="store un-normalised embeddings (what Karlo's prior statistics expect)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    embed_shards(
        args.input,
        args.output,
        args.clip,
        batch_size=args.batch_size,
        split_name=args.split_name,
        dtype=args.dtype,
        device=args.device,
        max_bad_fraction=args.max_bad_fraction,
        min_samples_for_abort=args.min_samples_for_abort,
        raw=args.raw,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
