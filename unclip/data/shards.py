"""Finding shards (brace patterns, globs, URLs) and reading their whitelisted members as raw samples."""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

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


def raw_samples(
    shards: Iterable[dict[str, str]],
    fields: Iterable[str],
    handler: Callable[[Exception], bool],
) -> Iterator[dict[str, Any]]:
    """Samples as dicts of raw bytes holding only the members of `fields` (plus `__key__` and
    `__url__`): other members are never read, so no decoder ever sees them."""
    selector = FileSelector(fields)
    for shard in shards:
        yield from tar_samples(shard["url"], handler, selector)


def in_order(urls: Iterable[str]) -> Iterator[dict[str, str]]:
    """Each shard once, in the order given (validation, the embed tool)."""
    for url in urls:
        yield {"url": url}
