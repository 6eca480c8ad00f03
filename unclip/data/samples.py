"""Read a bounded number of decoded samples from shards, in order (PCA fits, the demo, evaluation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from unclip.data.decoding import SampleDecoder, SkipTracker
from unclip.data.format import check_fields
from unclip.data.shards import expand_shards
from unclip.data.streams import Collate, materialise


def read_samples(
    shards: str | Sequence[str],
    fields: Sequence[str],
    max_samples: int,
    *,
    image_size: int = 64,
    config_key: str = "shards",
) -> dict[str, Any]:
    """Up to `max_samples` samples as one collated batch (tensors stacked, strings listed).
    Bad samples are skipped and counted as in training; `config_key` names the setting in errors."""
    urls = expand_shards(shards, config_key)
    decoder = SampleDecoder(check_fields(fields, config_key), image_size, None)
    tracker = SkipTracker(f"{config_key}={shards!r}", 0.05, 200)
    raws = materialise(urls, decoder, max_samples, tracker)
    if not raws:
        raise ValueError(f"{config_key}={shards!r}: no readable sample holds fields {list(fields)}")
    return Collate(decoder.fields)([decoder(raw) for raw in raws])


def read_embeddings(
    shards: str | Sequence[str], field: str, max_samples: int, config_key: str = "shards"
) -> torch.Tensor:
    """[N, D] float32 embeddings (`img_emb` or `txt_emb`) of up to `max_samples` samples."""
    return read_samples(shards, [field], max_samples, config_key=config_key)[field]
