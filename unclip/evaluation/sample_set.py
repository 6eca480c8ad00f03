"""Image metrics of a folder of sampled images (sample.py's run.json), for the demo and for users
scoring a `sample.py` run: FID/KID/CLIP score against the cached real validation statistics."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unclip.evaluation.features import load_features
from unclip.evaluation.image_metrics import score_images
from unclip.evaluation.reference import reference_features
from unclip.images import load_image

SHOWN = (("fid_clip", "FID (CLIP)"), ("kid_clip", "KID (CLIP)"), ("clip_score", "CLIP score"))


def score_sample_run(
    record: dict[str, Any],
    out_dir: str | Path,
    shards: str | Sequence[str],
    feature_model: str | None = None,
    reference_samples: int = 1000,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Every image of a sample run (with its caption) scored against `shards`' real images."""
    started = time.perf_counter()
    rows = [r for r in record["images"] if r.get("caption") is not None]
    images = torch.stack([load_image(Path(out_dir) / r["file"]) for r in rows])
    features = load_features(feature_model, shards)
    reference = reference_features(
        shards,
        features,
        features.facts,
        reference_samples,
        images.shape[-1],
        cache_dir=cache_dir,
    )
    metrics = score_images(images, [r["caption"] for r in rows], features, reference)
    return {
        **metrics,
        "images": len(rows),
        "reference_images": len(reference.features),
        "feature_model": features.spec,
        "reference_reused": reference.reused,
        "seconds": time.perf_counter() - started,
    }


def format_scores(scores: dict[str, Any]) -> str:
    """One line for the demo's report, beside its judge table."""
    shown = ", ".join(f"{name} {scores[key]:.4f}" for key, name in SHOWN if key in scores)
    return (
        f"generated vs {scores['reference_images']} real val images, features of the demo CLIP: "
        f"{shown} ({scores['images']} images, {scores['seconds']:.1f} s)"
    )
