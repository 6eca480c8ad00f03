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

    It is what `raw_samples` reports shards to: a read error (corrupt or truncated tar) counts as
    one bad sample, and a shard that errs, holds fewer samples than meta.json says, or holds none
    is warned about once per shard, naming it (resampled streams read the same shard many times).
    """

    def __init__(self, source: str, max_bad_fraction: float, min_samples_for_abort: int) -> None:
        self.source = source
        self.max_bad_fraction = max_bad_fraction
        self.min_samples_for_abort = min_samples_for_abort
        self.read = 0  # raw samples read from shards (before decoding)
        self.good = 0
        self.bad = 0
        self._reported = 0
        self._shard_errors: dict[str, str] = {}
        self._warned_shards: set[str] = set()

    def ok(self) -> None:
        self.good += 1

    def skip(self, url: str, key: str | None, reason: str, warn: bool = True) -> None:
        self.bad += 1
        where = f"{url} key {key}" if key else url
        if warn:
            log.warning("skipping a bad sample in %s: %s", where, reason)
        seen = self.good + self.bad
        if seen >= self.min_samples_for_abort and self.bad > self.max_bad_fraction * seen:
            raise DataError(
                f"{self.bad} of {seen} samples from {self.source} failed, more than "
                f"data.max_bad_fraction={self.max_bad_fraction}; last failure: {where}: {reason}"
            )

    def shard_error(self, url: str, error: Exception) -> None:
        """A read error inside a shard (webdataset's handler, bound to the shard's URL)."""
        args = getattr(error, "args", ())
        message = str(args[0]).split(" @ <", 1)[0] if args else ""
        reason = f"{type(error).__name__}: {message}"
        self._shard_errors.setdefault(url, reason)
        self.skip(url, None, reason, warn=False)  # shard_done warns once, with the counts

    def shard_done(self, url: str, samples: int, expected: int | None, failed: bool) -> None:
        """A shard read to its end (or to its first unrecoverable error)."""
        of = f" of the {expected} meta.json lists" if expected is not None else ""
        if failed:
            problem = (
                f"cannot be read to its end ({self._shard_errors.get(url, 'read error')}) after "
                f"{samples} samples{of}: truncated or corrupt, the rest is skipped"
            )
        elif expected is not None and samples != expected:
            problem = f"holds {samples} samples but meta.json lists {expected}: " + (
                "truncated?" if samples < expected else "meta.json is out of date?"
            )
            if samples < expected:
                self.skip(url, None, problem, warn=False)
        elif samples == 0:
            problem = "holds no sample (an empty tar)"
        else:
            return
        if url not in self._warned_shards:
            self._warned_shards.add(url)
            log.warning("shard %s %s", url, problem)

    def take_skipped(self) -> int:
        """Samples skipped since the last call (what a batch reports as `skipped`)."""
        count, self._reported = self.bad - self._reported, self.bad
        return count
