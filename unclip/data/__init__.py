"""Shards in, batches out: the shard format, safe decoding, rank/worker splitting, the datamodule,
the writer, the shapes dataset (`python -m unclip.data.shapes`) and the embed tool
(`python -m unclip.data.embed`); clip-retrieval embedding folders (`data=embeddings`) and the tool
joining them to img2dataset shards (`python -m unclip.data.join`).

Names are imported lazily so that `python -m unclip.data.shapes` does not pay for Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ShardDataModule": "unclip.data.datamodule",
    "EmbeddingDataModule": "unclip.data.embeddings",
    "find_partitions": "unclip.data.embedding_folder",
    "join_shards": "unclip.data.join",
    "ShardSetWriter": "unclip.data.writer",
    "AtomicShardWriter": "unclip.data.writer",
    "encode_sample": "unclip.data.writer",
    "RankSplitter": "unclip.data.splitting",
    "SampleDecoder": "unclip.data.decoding",
    "SkipTracker": "unclip.data.decoding",
    "BadSample": "unclip.data.decoding",
    "DataError": "unclip.data.decoding",
    "expand_shards": "unclip.data.shards",
    "read_meta": "unclip.data.format",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'unclip.data' has no attribute {name!r}")
