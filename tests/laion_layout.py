"""Writes clip-retrieval's inference layout as clip-retrieval does: float16 L2-normalised arrays
saved with np.save, and a parquet of image_path (the webdataset key), caption and url per partition.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def unit_rows(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    rows = rng.standard_normal((count, dim)).astype(np.float32)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)


def caption_of(key: str) -> str:
    return f"photo {int(key)}" if key.isdigit() else f"photo {key}"


def write_partition(
    root: Path,
    name: str,
    keys: Sequence[str],
    img: np.ndarray,
    txt: np.ndarray,
    captions: Sequence[str | None] | None = None,
) -> None:
    for folder, prefix, array in (("img_emb", "img_emb", img), ("text_emb", "text_emb", txt)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        np.save(root / folder / f"{prefix}_{name}.npy", array)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "image_path": list(keys),
            "caption": list(captions) if captions is not None else [caption_of(k) for k in keys],
            "url": [f"https://example.com/{k}.jpg" for k in keys],
        }
    )
    pq.write_table(table, root / "metadata" / f"metadata_{name}.parquet")


def laion_folder(
    root: Path, partitions: Sequence[Sequence[str]], dim: int, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One partition per key list (in the order given: not tar order); returns key -> (img, txt)
    of the first row holding that key. As with a real CLIP, a row's text embedding is near its
    image embedding (so a prior has something to learn)."""
    rng = np.random.default_rng(seed)
    written: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for number, keys in enumerate(partitions):
        img = unit_rows(len(keys), dim, rng)
        txt = img.astype(np.float32) + 0.3 * unit_rows(len(keys), dim, rng).astype(np.float32)
        txt = (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(np.float16)
        write_partition(root, f"{number:04d}", keys, img, txt)
        for key, a, b in zip(keys, img, txt, strict=True):
            written.setdefault(key, (a, b))
    return written


def numbered_keys(sizes: Sequence[int]) -> list[list[str]]:
    """img2dataset-style 9-digit keys, counted on across partitions."""
    out, key = [], 0
    for size in sizes:
        out.append([f"{k:09d}" for k in range(key, key + size)])
        key += size
    return out
