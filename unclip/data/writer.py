"""Writing samples in the shard format (see unclip.data.format) with webdataset's tar writers.

A sample to write is a dict with `__key__` (no dots: webdataset splits names at the first dot) and
any of: `image` (a PIL image, encoded as `image_format`) or ready-made bytes under `jpg`/`jpeg`/
`png`/`webp`; `txt` (str); `img_emb`/`txt_emb` (a vector, stored as `.npy` in `embed_dtype`);
`json` (a dict, or its bytes). Shards are reproducible: fixed member times and owners.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from unclip.data.format import EMBEDDING_FIELDS, FIELD_EXTENSIONS, IMAGE_EXTENSIONS

EMBED_DTYPES = ("float16", "float32")
# An integer mtime keeps every member a plain ustar header: a float one (webdataset's default type)
# makes tarfile add a PAX record per member, which doubles the shard and slows every reader.
TAR_OPTIONS = {"mtime": 0, "user": "unclip", "group": "unclip", "mode": 0o0644, "encoder": False}


def npy_bytes(vector: np.ndarray | torch.Tensor, dtype: str) -> bytes:
    """A 1-D vector as `.npy` bytes (never an object array: readers load with allow_pickle=False)."""
    if dtype not in EMBED_DTYPES:
        raise ValueError(f"embedding dtype must be one of {EMBED_DTYPES}, got {dtype!r}")
    if isinstance(vector, torch.Tensor):
        vector = vector.detach().cpu().float().numpy()
    array = np.asarray(vector, dtype=dtype)
    if array.ndim != 1:
        raise ValueError(f"an embedding must be a vector [D], got shape {list(array.shape)}")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def image_bytes(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format in ("jpg", "jpeg"):
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format=image_format.upper())
    return buffer.getvalue()


def encode_sample(
    sample: dict[str, Any], image_format: str = "png", embed_dtype: str = "float16"
) -> dict[str, Any]:
    """The tar members of one sample: {"__key__": key, extension: bytes}."""
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in key:
        raise ValueError(f"sample key must be a non-empty string without dots, got {key!r}")
    if image_format not in IMAGE_EXTENSIONS:
        raise ValueError(f"image_format must be one of {IMAGE_EXTENSIONS}, got {image_format!r}")
    members: dict[str, Any] = {"__key__": key}
    for name, value in sample.items():
        if name == "__key__":
            continue
        if name == "image":
            members[image_format] = image_bytes(value, image_format)
        elif name in IMAGE_EXTENSIONS or (name == "json" and isinstance(value, bytes)):
            members[name] = bytes(value)
        elif name == "txt":
            members["txt"] = str(value).encode("utf-8")
        elif name == "json":
            members["json"] = json.dumps(value, sort_keys=True).encode("utf-8")
        elif name in EMBEDDING_FIELDS:
            members[FIELD_EXTENSIONS[name][0]] = npy_bytes(value, embed_dtype)
        else:
            raise ValueError(f"sample {key}: unknown field {name!r} (not part of the shard format)")
    return members


class ShardSetWriter:
    """Numbered shards `<folder>/<prefix>-%06d.tar` of at most `max_count` samples each, through
    webdataset's ShardWriter."""

    def __init__(
        self,
        folder: str | Path,
        prefix: str = "train",
        max_count: int = 10_000,
        start_shard: int = 0,
        image_format: str = "png",
        embed_dtype: str = "float16",
    ) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.image_format = image_format
        self.embed_dtype = embed_dtype
        self.shards: list[str] = []
        self._writer = wds.ShardWriter(
            str(Path(folder) / f"{prefix}-%06d.tar"),
            maxcount=max_count,
            start_shard=start_shard,
            verbose=0,
            post=self.shards.append,
            **TAR_OPTIONS,
        )

    def write(self, sample: dict[str, Any]) -> None:
        self._writer.write(encode_sample(sample, self.image_format, self.embed_dtype))

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AtomicShardWriter:
    """One shard written under a temporary name and renamed when complete, so a file with the
    final name is always a finished shard (what resumable tools test for)."""

    def __init__(
        self, path: str | Path, image_format: str = "png", embed_dtype: str = "float16"
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.image_format = image_format
        self.embed_dtype = embed_dtype
        self.count = 0
        self._writer = wds.TarWriter(str(self.tmp), **TAR_OPTIONS)

    def write(self, sample: dict[str, Any]) -> None:
        self._writer.write(encode_sample(sample, self.image_format, self.embed_dtype))
        self.count += 1

    def __enter__(self) -> AtomicShardWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self._writer.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
