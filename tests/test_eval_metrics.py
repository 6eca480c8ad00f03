"""Image metrics on CLIP features: FID/KID of a shard set against itself is ~0 and grows as the
images are degraded, CLIP score ranks matching captions above shuffled ones, and the reference
statistics are cached beside the shards and recomputed when the feature model changes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EVAL_IMAGE_SIZE, NUM_EVAL_SAMPLES, save_local_dir
from torchvision.transforms.functional import gaussian_blur

from unclip.data.samples import read_samples
from unclip.evaluation.features import ClipImageFeatures, load_features
from unclip.evaluation.image_metrics import (
    INCEPTION_SKIPPED,
    inception_fid,
    manifold_precision_recall,
    score_images,
)
from unclip.evaluation.reference import CACHE_FOLDER, reference_features

NUM_VAL = NUM_EVAL_SAMPLES


@pytest.fixture(scope="module")
def real(eval_shards: Path) -> dict:
    return read_samples(
        str(eval_shards / "val-*.tar"), ["image", "txt"], NUM_VAL, image_size=EVAL_IMAGE_SIZE
    )


@pytest.fixture(scope="module")
def features(eval_shards: Path) -> ClipImageFeatures:
    # no spec: the CLIP named in the shards' meta.json
    return load_features(None, str(eval_shards / "val-*.tar"))


def reference(shards: Path, features: ClipImageFeatures, **kwargs):
    return reference_features(
        str(shards / "val-*.tar"), features, features.facts, NUM_VAL, EVAL_IMAGE_SIZE, **kwargs
    )


def test_fid_of_a_shard_set_against_itself_is_zero_and_grows_with_blur_and_noise(
    eval_shards: Path, features: ClipImageFeatures, real: dict
) -> None:
    ref = reference(eval_shards, features)
    images, captions = real["image"], real["txt"]
    itself = score_images(images, captions, features, ref)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator)
    blurred = [
        score_images(gaussian_blur(images, [9, 9], [s, s]), captions, features, ref)
        for s in (0.6, 1.2, 2.0, 3.5)
    ]
    noised = [
        score_images((images + a * noise).clamp(-1, 1), captions, features, ref)
        for a in (0.1, 0.25, 0.5, 1.0)
    ]
    for series in (blurred, noised):
        fids = [itself["fid_clip"]] + [s["fid_clip"] for s in series]
        assert fids == sorted(fids) and len(set(fids)) == len(fids), fids
        # KID is unbiased: identical sets score slightly below 0; it rises with the damage too
        kids = [itself["kid_clip"]] + [s["kid_clip"] for s in series]
        assert kids == sorted(kids) and kids[-1] - kids[0] > 0.01, kids
        assert series[-1]["precision"] < itself["precision"]
    assert itself["fid_clip"] < 1e-3 * blurred[-1]["fid_clip"]
    assert itself["fid_clip"] < 1e-6
    assert itself["precision"] == itself["recall"] == 1.0


def test_clip_score_ranks_matching_captions_above_shuffled_ones(
    eval_shards: Path, features: ClipImageFeatures, real: dict
) -> None:
    ref = reference(eval_shards, features)
    images, captions = real["image"], list(real["txt"])
    matching = score_images(images, captions, features, ref)["clip_score"]
    rng = np.random.default_rng(0)
    shuffled = [
        score_images(images, list(rng.permutation(captions)), features, ref)["clip_score"]
        for _ in range(3)
    ]
    assert 0 <= max(shuffled) < matching <= 100
    assert matching - max(shuffled) > 20, (matching, shuffled)


def test_reference_statistics_are_cached_reused_and_invalidated_by_a_new_feature_model(
    eval_shards: Path, eval_clip_spec: str, tmp_path: Path
) -> None:
    shards = str(eval_shards / "val-*.tar")
    first_model = load_features(eval_clip_spec, shards)
    first = reference(eval_shards, first_model)
    again = reference(eval_shards, load_features(eval_clip_spec, shards))
    assert again.reused and again.path == first.path
    assert first.path.parent == eval_shards / CACHE_FOLDER  # beside the shards
    assert torch.equal(again.features, first.features)
    assert again.facts["feature_model"] == eval_clip_spec and again.facts["weights_sha1"]

    # the same spec, retrained weights (a last.ckpt overwritten): recomputed
    folder = Path(eval_clip_spec.removeprefix("local-dir:"))
    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    changed = {
        k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in state.items()
    }
    spec = save_local_dir(tmp_path, state)
    before = reference(eval_shards, load_features(spec, shards))
    save_local_dir(tmp_path, changed)
    after = reference(eval_shards, load_features(spec, shards))
    assert not after.reused and after.path not in (first.path, before.path)
    assert not torch.allclose(after.features, before.features)
    assert reference(eval_shards, load_features(spec, shards)).reused
    # a folder elsewhere when asked (read-only shards)
    elsewhere = reference(eval_shards, first_model, cache_dir=tmp_path / "cache")
    assert not elsewhere.reused and elsewhere.path.parent == tmp_path / "cache"


def test_inception_fid_is_skipped_with_a_message_without_weights(caplog, eval_shards: Path) -> None:
    with caplog.at_level(logging.INFO):
        assert inception_fid(None, str(eval_shards / "val-*.tar"), 10, EVAL_IMAGE_SIZE) is None
    assert INCEPTION_SKIPPED in caplog.text
    with pytest.raises(FileNotFoundError, match="feature_extractor_weights_path"):
        inception_fid("/nope.pth", str(eval_shards / "val-*.tar"), 10, EVAL_IMAGE_SIZE)


def test_manifold_precision_recall_sees_mode_dropping() -> None:
    generator = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(100, 4, generator=generator) + c for c in (-5.0, 5.0)])
    one_mode = torch.randn(100, 4, generator=generator) + 5.0
    precision, recall = manifold_precision_recall(real, one_mode)
    assert precision > 0.8 and 0.3 < recall < 0.7  # every sample real-looking; half the modes
    far = torch.randn(100, 4, generator=generator) + 20.0
    assert manifold_precision_recall(real, far) == (0.0, 0.0)


def test_a_sample_run_folder_is_scored_for_the_demo(
    eval_shards: Path, real: dict, tmp_path: Path
) -> None:
    """What the demo prints beside its table: a sample.py run's PNGs scored against the val set."""
    from unclip.evaluation.sample_set import format_scores, score_sample_run
    from unclip.images import save_images

    names = [f"{i:03d}" for i in range(NUM_VAL)]
    files = save_images(real["image"], tmp_path / "images", names)
    record = {
        "images": [
            {"file": str(path.relative_to(tmp_path)), "caption": caption}
            for path, caption in zip(files, real["txt"], strict=True)
        ]
    }
    shards = str(eval_shards / "val-*.tar")
    scores = score_sample_run(record, tmp_path, shards, reference_samples=NUM_VAL)
    captions = [r["caption"] for r in record["images"]]
    shuffled = [
        {**r, "caption": captions[(i + 7) % NUM_VAL]} for i, r in enumerate(record["images"])
    ]
    worse = score_sample_run({"images": shuffled}, tmp_path, shards, reference_samples=NUM_VAL)
    noisy = (real["image"] + 0.5 * torch.randn(NUM_VAL, 3, EVAL_IMAGE_SIZE, EVAL_IMAGE_SIZE)).clamp(
        -1, 1
    )
    save_images(noisy, tmp_path / "images", names)
    noised = score_sample_run(record, tmp_path, shards, reference_samples=NUM_VAL)
    assert scores["images"] == NUM_VAL and scores["reference_images"] == NUM_VAL
    assert scores["clip_score"] > worse["clip_score"] + 20
    assert scores["fid_clip"] < 1e-3  # the real images themselves, through PNG files
    assert noised["fid_clip"] > 0.05 and noised["reference_reused"]
    line = format_scores(scores)
    assert "FID (CLIP)" in line and "KID (CLIP)" in line and "CLIP score" in line
