"""clip-retrieval's inference output (what LAION publishes): find, check and read its partitions.

    ROOT/img_emb/img_emb_{N}.npy          float16 (or float32) [n_N, D], L2-normalised
    ROOT/text_emb/text_emb_{N}.npy        the same n_N rows
    ROOT/metadata/metadata_{N}.parquet    image_path (= the webdataset key), caption, ...

Row i of a partition's three files is one sample. Partitions follow no tar order, so the key is the
only link to the images. Headers are read with `np.load(mmap_mode="r", allow_pickle=False)`; each
read then memory-maps just the rows it needs and closes the map after it, so what a reader holds
(and what the OS maps in for it) is one chunk, however large the file. pyarrow is imported only here (the `laion` extra).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CAPTION_COLUMN = "caption"
KEY_COLUMN = "image_path"
PARTITION_PATTERN = re.compile(r"^img_emb_(\d+)\.npy$")
NORM_TOLERANCE = 0.01  # float16 rounding moves a unit vector's norm by ~1e-3
NORM_CHECK_ROWS = 16


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "reading clip-retrieval metadata needs pyarrow: pip install 'unclip[laion]'"
        ) from error
    return pq


@dataclass(frozen=True)
class Partition:
    """One partition's three files and the facts read from their headers."""

    name: str  # the N of img_emb_{N}.npy, as written (zero-padded)
    img: Path
    txt: Path
    meta: Path
    rows: int
    dim: int
    dtype: str
    img_offset: int  # where the array data starts in each .npy (after its header)
    txt_offset: int


def open_array(path: Path) -> np.ndarray:
    """A read-only memory map of a plain `.npy` array (object arrays and pickles are refused)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - pickles, garbage, truncation
        raise ValueError(
            f"{path}: not a plain .npy array ({type(error).__name__}: {error})"
        ) from None


def _array_header(path: Path) -> tuple[tuple[int, ...], str, int]:
    """(shape, dtype, data offset) of a plain C-order float [rows, D] `.npy`."""
    array = open_array(path)
    try:
        if array.dtype.kind != "f" or array.ndim != 2 or not array.flags.c_contiguous:
            raise ValueError(
                f"{path}: expected a C-order float16/float32 array [rows, D], got {array.dtype} "
                f"{list(array.shape)}"
            )
        return array.shape, str(array.dtype), int(array.offset)
    finally:
        del array


def map_rows(path: Path, dtype: str, dim: int, offset: int, start: int, stop: int) -> np.ndarray:
    """A read-only memory map of rows [start, stop) only (not the whole file: what is mapped,
    and so what can become resident, is one chunk)."""
    row_bytes = dim * np.dtype(dtype).itemsize
    return np.memmap(
        path, dtype=dtype, mode="r", offset=offset + start * row_bytes, shape=(stop - start, dim)
    )


def _parquet_rows(path: Path) -> int:
    pq = _pyarrow_parquet()
    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # noqa: BLE001 - not a parquet file
        raise ValueError(f"{path}: not a parquet file ({type(error).__name__}: {error})") from None
    missing = {CAPTION_COLUMN, KEY_COLUMN} - set(parquet.schema_arrow.names)
    if missing:
        raise ValueError(
            f"{path}: no {sorted(missing)} column (has {parquet.schema_arrow.names}); "
            f"clip-retrieval writes {KEY_COLUMN!r} and {CAPTION_COLUMN!r}"
        )
    return parquet.metadata.num_rows


def _check_normalised(part: Partition, config_key: str) -> None:
    for path in (part.img, part.txt):
        array = open_array(path)
        norms = np.linalg.norm(np.asarray(array[:NORM_CHECK_ROWS], dtype=np.float32), axis=1)
        del array
        norms = norms[np.isfinite(norms)]
        if len(norms) and np.abs(norms - 1).max() > NORM_TOLERANCE:
            raise ValueError(
                f"{config_key}=true but rows of {path} have norms {norms.min():.3f}..."
                f"{norms.max():.3f}, not 1: set {config_key}=false"
            )


def find_partitions(
    root: str | Path,
    embed_dim: int | None = None,
    *,
    normalized: bool | None = None,
    config_key: str = "data.root",
) -> list[Partition]:
    """Every complete partition under `root`, in the order of N, with its shape checked: the three
    files exist, hold the same number of rows, embeddings are float [rows, embed_dim] (the first
    partition's D when `embed_dim` is None), the metadata has `image_path` and `caption`, and, when
    `normalized` is true, the first rows are unit vectors. Any failure names the file."""
    root = Path(root)
    img_dir = root / "img_emb"
    if not img_dir.is_dir():
        raise FileNotFoundError(
            f"{config_key}={str(root)!r}: no img_emb/ folder (expected clip-retrieval's "
            f"img_emb/img_emb_N.npy, text_emb/text_emb_N.npy, metadata/metadata_N.parquet)"
        )
    names = sorted(
        (m.group(1) for p in img_dir.iterdir() if (m := PARTITION_PATTERN.match(p.name))),
        key=int,
    )
    if not names:
        raise FileNotFoundError(f"{config_key}={str(root)!r}: no img_emb/img_emb_N.npy file")
    parts = []
    for name in names:
        img = img_dir / f"img_emb_{name}.npy"
        txt = root / "text_emb" / f"text_emb_{name}.npy"
        meta = root / "metadata" / f"metadata_{name}.parquet"
        for path in (txt, meta):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing (partition {name} has {img.name})")
        (rows, dim), dtype, img_offset = _array_header(img)
        txt_shape, txt_dtype, txt_offset = _array_header(txt)
        meta_rows = _parquet_rows(meta)
        if txt_shape != (rows, dim) or meta_rows != rows:
            raise ValueError(
                f"partition {name}: {img} holds {rows} rows of D={dim} but {txt} "
                f"{list(txt_shape)} and {meta} {meta_rows} rows; row i of the three must be one sample"
            )
        if txt_dtype != dtype:
            raise ValueError(f"{img} holds {dtype} but {txt} {txt_dtype}: store both alike")
        expected = embed_dim if embed_dim is not None else (parts[0].dim if parts else dim)
        if dim != expected:
            source = "data.embed_dim" if embed_dim is not None else f"partition {parts[0].name}"
            raise ValueError(f"{img} holds D={dim} embeddings but {source} is {expected}")
        part = Partition(name, img, txt, meta, rows, dim, dtype, img_offset, txt_offset)
        if normalized:
            _check_normalised(part, "data.normalized")
        parts.append(part)
    return parts


def copy_embeddings(
    part: Partition, start: int, stop: int, img_out: np.ndarray, txt_out: np.ndarray
) -> None:
    """Copy rows [start, stop) of a partition's image and text embeddings into the given arrays
    (as stored: no conversion); the memory maps are closed again before returning."""
    img = map_rows(part.img, part.dtype, part.dim, part.img_offset, start, stop)
    txt = map_rows(part.txt, part.dtype, part.dim, part.txt_offset, start, stop)
    try:
        img_out[:] = img
        txt_out[:] = txt
    finally:
        del img, txt


def read_metadata(part: Partition, columns: Sequence[str] = (KEY_COLUMN, CAPTION_COLUMN)) -> Any:
    """A partition's metadata columns as a pyarrow table (nothing else of the file is decoded)."""
    return _pyarrow_parquet().ParquetFile(part.meta).read(columns=list(columns))


class MetadataCache:
    """The keys and captions of the partition read last. A worker walks its chunks partition by
    partition, so each partition's columns are decoded about once per pass."""

    def __init__(self) -> None:
        self._name: str | None = None
        self._table: Any = None

    def rows(self, part: Partition, start: int, stop: int) -> tuple[list, list]:
        if self._name != part.name:
            self._table = read_metadata(part)
            self._name = part.name
        piece = self._table.slice(start, stop - start)
        return piece.column(KEY_COLUMN).to_pylist(), piece.column(CAPTION_COLUMN).to_pylist()
