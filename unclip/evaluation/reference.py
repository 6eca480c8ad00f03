"""Features of the real validation images, computed once per (shard set, feature model) and cached
beside the shards with the facts that made them, so every run scored against them is comparable.

The cache key is a hash of those facts: the shard files (names, sizes, modification times), how many
images at which size, and the feature model (its spec and a hash of its weights). Change any of them
and a new reference is computed; the facts are stored beside the features (`.json`) and checked on
load. Shards in a read-only or remote place cache under `cache_dir` instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unclip.data.format import is_remote, local_path, write_json_atomic
from unclip.data.samples import read_samples
from unclip.data.shards import expand_shards, shard_dir

log = logging.getLogger(__name__)

CACHE_FOLDER = "eval_reference"
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Reference:
    features: torch.Tensor  # [N, D] float64 features of the real images
    facts: dict[str, Any]
    path: Path
    reused: bool  # True when read from the cache, False when computed now


def shard_facts(urls: Sequence[str]) -> list[dict[str, Any]]:
    """What identifies the shard files: a rewritten shard changes its size or time."""
    facts = []
    for url in urls:
        if is_remote(url):
            facts.append({"url": url})
            continue
        stat = local_path(url).stat()
        facts.append(
            {"file": local_path(url).name, "bytes": stat.st_size, "mtime": int(stat.st_mtime)}
        )
    return facts


def cache_folder(urls: Sequence[str], cache_dir: str | Path | None) -> Path:
    folder = shard_dir(urls)
    if cache_dir is not None:
        return Path(cache_dir)
    if folder is None or not os.access(folder, os.W_OK):
        raise ValueError(
            f"cannot cache reference statistics beside {urls[0]!r} (remote or read-only): "
            f"set eval.cache_dir to a writable folder"
        )
    return folder / CACHE_FOLDER


def reference_features(
    shards: str | Sequence[str],
    features: FeatureFn,
    feature_facts: dict[str, Any],
    num_samples: int,
    image_size: int,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
) -> Reference:
    """Features [N, D] of the first `num_samples` real images of `shards` at `image_size`, from the
    cache when its facts match, else computed with `features` and cached."""
    urls = expand_shards(shards, "eval.shards")
    facts = {
        "shards": shard_facts(urls),
        "num_samples": int(num_samples),
        "image_size": int(image_size),
        **feature_facts,
    }
    key = hashlib.sha1(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_folder(urls, cache_dir)
    path, facts_path = folder / f"{key}.npy", folder / f"{key}.json"
    if path.is_file() and facts_path.is_file():
        stored = json.loads(facts_path.read_text())
        if stored.get("facts") == facts:
            cached = np.load(path, allow_pickle=False)
            return Reference(torch.from_numpy(cached), facts, path, reused=True)
    log.info("computing reference features of %d real images of %s", num_samples, shards)
    images = read_samples(urls, ["image"], num_samples, image_size=image_size)["image"]
    computed = torch.cat(
        [
            features(images[i : i + batch_size]).double().cpu()
            for i in range(0, len(images), batch_size)
        ]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, computed.numpy(), allow_pickle=False)
    os.replace(tmp, path)
    write_json_atomic(facts_path, {"facts": facts, "count": len(computed)})
    return Reference(computed, facts, path, reused=False)
