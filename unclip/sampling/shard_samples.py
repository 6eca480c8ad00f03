"""Moved to `unclip.data.samples` (evaluation, below sampling, reads shards the same way)."""

from unclip.data.samples import read_embeddings, read_samples

__all__ = ["read_embeddings", "read_samples"]
