"""Finding shards (brace patterns, globs, URLs) and reading their whitelisted members as raw samples."""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from webdataset.shardlists import expand_urls

from unclip.data.format import FileSelector, is_remote, local_path
from unclip.data.tar_reader import tar_samples

log = logging.getLogger(__name__)

GLOB_CHARS = "*?["


def expand_shards(spec: str | Sequence[str], config_key: str) -> list[str]:
    """Every shard of a spec, in order: brace patterns (`train-{000000..000015}.tar`), `::`-joined
    lists, local globs (`train-*.tar`, sorted), or any URL webdataset opens (`pipe:`, `https://`).

    Missing local files are dropped with a warning; when none is left the error names `config_key`.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        for url in expand_urls(str(item)):
            if not is_remote(url) and any(c in url for c in GLOB_CHARS):
                urls.extend(sorted(glob.glob(str(local_path(url)))))
            else:
                urls.append(url)
    exists = {u: is_remote(u) or local_path(u).is_file() for u in urls}
    found = [u for u in urls if exists[u]]
    missing = [u for u in urls if not exists[u]]
    if not found:
        raise FileNotFoundError(
            f"{config_key}={spec!r}: no shard found"
            + (f" ({len(missing)} named, none exists, e.g. {missing[0]})" if missing else "")
        )
    if missing:
        log.warning(
            "%s: %d of %d shards do not exist and are left out, e.g. %s",
            config_key,
            len(missing),
            len(urls),
            missing[:3],
        )
    return found


def shard_dir(urls: Sequence[str]) -> Path | None:
    """The local folder of a shard set (where its sidecars live), or None for remote shards."""
    return None if is_remote(urls[0]) else local_path(urls[0]).parent


class ShardReport(Protocol):
    """What raw_samples tells about each shard it reads (SkipTracker implements it)."""

    def shard_error(self, url: str, error: Exception) -> None: ...

    def shard_done(self, url: str, samples: int, expected: int | None, failed: bool) -> None: ...


class HandlerReport:
    """A plain webdataset-style handler (`error -> carry on?`) as a ShardReport."""

    def __init__(self, handler: Callable[[Exception], bool]) -> None:
        self.handler = handler

    def shard_error(self, url: str, error: Exception) -> None:
        if not self.handler(error):
            raise error

    def shard_done(self, url: str, samples: int, expected: int | None, failed: bool) -> None:
        pass


def raw_samples(
    shards: Iterable[dict[str, Any]],
    fields: Iterable[str],
    report: ShardReport | Callable[[Exception], bool],
    expected: Mapping[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Samples as dicts of raw bytes holding only the members of `fields` (plus `__key__` and
    `__url__`): other members are never read, so no decoder ever sees them.

    Shards are read one at a time, so every error is reported with its shard's URL and each shard's
    sample count can be held to `expected` (meta.json's, by file name) once it is read to its end.
    After a read error the shard's last sample is dropped when it lacks members the first one has:
    it is the one the error cut short. A
    shard dict may carry `range: (a, b)` (keep samples a..b-1) and `every: (n, i)` (keep those
    whose index is i modulo n): streams sharing a shard each keep their own samples."""
    selector = FileSelector(fields)
    if not hasattr(report, "shard_error"):
        report = HandlerReport(report)
    for shard in shards:
        url = shard["url"]
        first, stop = shard.get("range", (0, None))
        stride, offset = shard.get("every", (1, 0))

        def wanted(index: int, first: int = first, stride: int = stride, offset: int = offset):
            return index >= first and index % stride == offset

        errors: list[Exception] = []

        def handler(error: Exception, url: str = url, errors: list = errors) -> bool:
            errors.append(error)
            report.shard_error(url, error)
            return True

        count, previous, to_end, first_members = 0, None, True, None
        for sample in tar_samples(url, handler, selector):
            first_members = first_members or members(sample)
            if previous is not None and wanted(count - 1):
                yield previous
            previous = sample
            count += 1
            if stop is not None and count > stop:
                previous, to_end = None, False  # past this stream's range: stop reading
                break
        if previous is not None and errors and members(previous) != first_members:
            previous, count = None, count - 1  # the sample the error cut short
        if previous is not None and wanted(count - 1):
            yield previous
        if not to_end:
            continue
        report.shard_done(url, count, (expected or {}).get(shard_name(url)), bool(errors))


def members(sample: dict[str, Any]) -> frozenset[str]:
    return frozenset(k for k in sample if not k.startswith("__"))


def shard_name(url: str) -> str:
    """The file name of a shard URL: how meta.json names it."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def in_order(urls: Iterable[str]) -> Iterator[dict[str, str]]:
    """Each shard once, in the order given (validation, the embed tool)."""
    for url in urls:
        yield {"url": url}
