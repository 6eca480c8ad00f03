"""Safe decoding of whitelisted sample fields, and the skip-and-count policy for bad samples.

Nothing here unpickles: images go through PIL, embeddings through `np.load(allow_pickle=False)`,
captions through UTF-8 and metadata through `json.loads`. A sample that fails is skipped with a
warning naming its shard and key and counted; when failures stop being the exception the run stops.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from unclip.data.format import EMBEDDING_FIELDS, FIELD_EXTENSIONS, OPTIONAL_FIELDS

log = logging.getLogger(__name__)


class BadSample(ValueError):
    """A sample that cannot be used; the message says why."""


class DataError(RuntimeError):
    """The data as a whole is unusable (too many bad samples, no samples at all)."""


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """RGB float [-1, 1] tensor [3, size, size]: shorter side resized to `size`, then center-cropped."""
    with Image.open(io.BytesIO(data)) as opened:
        if opened.format == "JPEG":  # decode at the smallest DCT scale still >= size: much faster
            opened.draft("RGB", (size, size))
        opened.load()  # decode fully now: a truncated file raises here, not later
        image = to_rgb(opened)
    width, height = image.size
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BICUBIC)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_rgb(image: Image.Image) -> Image.Image:
    """Transparent pixels become white (not the black a bare `convert("RGB")` gives)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


NPY_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=64)
def npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape of a `.npy` header, parsed once per distinct header: every vector of a shard
    set shares one, and numpy's parser costs ten times the copy of a 768-float vector."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    if dtype.hasobject:
        raise ValueError("object arrays need pickle, which is never allowed")
    return dtype, shape


def npy_header_end(data: bytes) -> int:
    """Where a `.npy` file's data starts: magic, version, header length, header."""
    if len(data) < 10 or not data.startswith(NPY_MAGIC):
        raise ValueError("not a .npy file (bad magic)")
    if data[6] == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    return 12 + int.from_bytes(data[8:12], "little")


def decode_embedding(data: bytes, expected_dim: int | None) -> np.ndarray:
    """A float32 vector [D] from `.npy` bytes; object arrays, pickles and wrong shapes are refused.

    Reads the header with numpy's own parser (cached) and the data with `np.frombuffer`: what
    `np.load(allow_pickle=False)` does, without re-parsing the same header for every sample."""
    try:
        start = npy_header_end(data)
        dtype, shape = npy_layout(bytes(data[:start]))
        count = math.prod(shape)
        if len(data) - start != count * dtype.itemsize:
            raise ValueError(f"{len(data) - start} data bytes for shape {list(shape)} of {dtype}")
        array = np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape)
    except Exception as error:  # noqa: BLE001 - pickled objects, garbage, truncation
        raise BadSample(f"not a plain .npy array ({error})") from error
    if array.dtype.kind != "f":
        raise BadSample(f"expected a float16/float32 .npy array, got {array.dtype}")
    if array.ndim != 1 or (expected_dim is not None and array.shape[0] != expected_dim):
        raise BadSample(f"expected shape [{expected_dim or 'D'}], got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise BadSample("embedding holds NaN or inf")
    return array.astype(np.float32)


class SampleDecoder:
    """Turns one raw sample (bytes of whitelisted members) into the batch fields a stage asked for."""

    def __init__(self, fields: tuple[str, ...], image_size: int, embed_dim: int | None) -> None:
        self.fields = fields
        self.image_size = image_size
        # None: take the first sample's size, then hold every later sample to it
        self.embed_dim = embed_dim

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        sample: dict[str, Any] = {"__key__": raw["__key__"]}
        for name in self.fields:
            data = next((raw[e] for e in FIELD_EXTENSIONS[name] if e in raw), None)
            if data is None:
                if name in OPTIONAL_FIELDS:
                    sample[name] = None
                    continue
                raise BadSample(
                    f"no {name} file (expected KEY.{'/'.join(FIELD_EXTENSIONS[name])}; a key "
                    f"holding a dot splits a sample apart)"
                )
            sample[name] = self._decode(name, data)
        return sample

    def _decode(self, name: str, data: bytes) -> Any:
        try:
            if name == "image":
                return decode_image(data, self.image_size)
            if name == "txt":
                return data.decode("utf-8").strip()
            if name == "json":
                return json.loads(data.decode("utf-8"))
        except BadSample:
            raise
        except Exception as error:  # noqa: BLE001 - every decoder failure is a bad sample
            raise BadSample(f"cannot decode {name}: {type(error).__name__}: {error}") from error
        assert name in EMBEDDING_FIELDS, name
        vector = decode_embedding(data, self.embed_dim)
        if self.embed_dim is None:
            self.embed_dim = vector.shape[0]
        return torch.from_numpy(vector)


class SkipTracker:
    """Counts good and bad samples in one worker, warns about each bad one, and stops the run when
    more than `max_bad_fraction` of at least `min_samples_for_abort` samples have failed.

    Its `handler` is the webdataset exception handler: it logs, counts and returns True (carry on),
    without webdataset's 0.5 s sleep per failure.
    """

    def __init__(self, source: str, max_bad_fraction: float, min_samples_for_abort: int) -> None:
        self.source = source
        self.max_bad_fraction = max_bad_fraction
        self.min_samples_for_abort = min_samples_for_abort
        self.read = 0  # raw samples read from shards (before decoding)
        self.good = 0
        self.bad = 0
        self._reported = 0

    def ok(self) -> None:
        self.good += 1

    def skip(self, url: str, key: str | None, reason: str) -> None:
        self.bad += 1
        where = f"{url} key {key}" if key else url
        log.warning("skipping a bad sample in %s: %s", where, reason)
        seen = self.good + self.bad
        if seen >= self.min_samples_for_abort and self.bad > self.max_bad_fraction * seen:
            raise DataError(
                f"{self.bad} of {seen} samples from {self.source} failed, more than "
                f"data.max_bad_fraction={self.max_bad_fraction}; last failure: {where}: {reason}"
            )

    def handler(self, error: Exception) -> bool:
        """webdataset's `handler=`: a corrupt tar, an unreadable shard, a duplicate member."""
        args = getattr(error, "args", ())
        url = next((a for a in reversed(args[1:]) if isinstance(a, str)), "?")
        message = str(args[0]) if args else ""
        self.skip(url, None, f"{type(error).__name__}: {message}")
        return True

    def take_skipped(self) -> int:
        """Samples skipped since the last call (what a batch reports as `skipped`)."""
        count, self._reported = self.bad - self._reported, self.bad
        return count
