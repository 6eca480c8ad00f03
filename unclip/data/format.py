"""The shard format: which files a sample holds, and the `meta.json` sidecar of embedded shards.

A sample is the set of adjacent tar members sharing a key (the file name up to its first dot):
`KEY.png`, `KEY.txt`, `KEY.img_emb.npy`, `KEY.txt_emb.npy`, `KEY.json`. Everything else in a tar
is never read, so nothing outside this whitelist can reach a decoder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FIELDS = ("image", "txt", "img_emb", "txt_emb", "json")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FIELD_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": IMAGE_EXTENSIONS,
    "txt": ("txt",),
    "img_emb": ("img_emb.npy",),
    "txt_emb": ("txt_emb.npy",),
    "json": ("json",),
}
OPTIONAL_FIELDS = frozenset({"json"})  # metadata: None in the batch when a sample has none
EMBEDDING_FIELDS = ("img_emb", "txt_emb")
DEFAULT_FIELDS = ("image", "txt")
META_FILE = "meta.json"


def check_fields(fields: Iterable[str] | None, config_key: str = "data.fields") -> tuple[str, ...]:
    """The requested fields in canonical order; unknown names fail naming the config key."""
    if fields is None:
        return DEFAULT_FIELDS
    if isinstance(fields, str):
        fields = [fields]
    fields = list(fields)
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown or not fields:
        raise ValueError(f"{config_key}={fields}: each must be one of {list(FIELDS)}")
    return tuple(f for f in FIELDS if f in fields)


def extension(file_name: str) -> str:
    """What webdataset groups a member under: the lower-cased name after the basename's first dot."""
    base = file_name.rsplit("/", 1)[-1]
    return base.split(".", 1)[1].lower() if "." in base else ""


class FileSelector:
    """Picklable `select_files` predicate: a member is read only when its last suffix belongs to a
    requested field (`.png`, `.npy`, ...), so `.pyd`/`.pth` payloads and the images a prior does not
    need are never even read. Decoders then look fields up by exact extension, so a member such as
    `KEY.mask.png` is ignored, and a key with a dot (`a.b.png`) arrives as a sample without its
    fields, which is skipped and named instead of vanishing silently."""

    def __init__(self, fields: Iterable[str]) -> None:
        self.suffixes = frozenset(
            ext.rsplit(".", 1)[-1] for f in fields for ext in FIELD_EXTENSIONS[f]
        )

    def __call__(self, file_name: str) -> bool:
        return extension(file_name).rsplit(".", 1)[-1] in self.suffixes


def is_remote(url: str) -> bool:
    """URLs webdataset opens itself (`pipe:`, `https://`, `gs://`, ...) rather than local paths."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file:"))


def local_path(url: str) -> Path:
    """The path of a local shard given as a path, `file:/path` or `file:///path`."""
    return Path(url.removeprefix("file://").removeprefix("file:"))


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """The sidecar at `path` (a meta.json or the folder holding one), or None when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temporary file so a crash never leaves a half-written sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def embedding_meta(
    clip: str, embed_dim: int, *, normalized: bool = True, dtype: str = "float16", **extra: Any
) -> dict[str, Any]:
    """The sidecar of an embedded shard set: which CLIP made it, its size, whether unit-norm."""
    return {
        "clip": clip,
        "embed_dim": int(embed_dim),
        "normalized": normalized,
        "dtype": dtype,
        **extra,
    }
