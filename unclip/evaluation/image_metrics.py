"""Image metrics of generated images against cached real ones, in a named CLIP's feature space.

- `fid_clip`: Fréchet distance between Gaussians fitted to real and generated CLIP image
  embeddings (torchmetrics `FrechetInceptionDistance(feature=<CLIP tower>)`); 0 = same statistics.
- `kid_clip` (+ `kid_clip_std`): kernel inception distance on the same features (torchmetrics
  `KernelInceptionDistance`), unbiased, so small sample counts compare fairly.
- `clip_score`: mean 100 * max(cos(image, caption), 0) with the same CLIP. torchmetrics' `CLIPScore`
  only takes Hugging Face CLIP models, so it is computed here from the open_clip embeddings.
- `precision` / `recall`: the k-NN manifold estimate (Kynkäänniemi et al. 2019): the fraction of
  generated images inside the real images' k-NN balls, and of real images inside the generated ones'.
- `fid_inception`: the classic Inception-v3 FID, only when `inception_weights_path` names its weights
  file (they cannot be downloaded here); otherwise it is skipped with a message saying so.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from unclip.evaluation.features import ClipImageFeatures
from unclip.evaluation.reference import Reference, reference_features

log = logging.getLogger(__name__)

INCEPTION_SKIPPED = (
    "Inception FID skipped: eval.feature_extractor_weights_path is not set (Inception-v3 weights "
    "are never downloaded; give the path of pt_inception-2015-12-05-6726825d.pth to compute it)"
)


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score [B]: 100 * max(cos(image, caption), 0)."""
    cosine = F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
    return 100 * cosine.clamp(min=0)


def manifold_precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = 3
) -> tuple[float, float]:
    """(precision, recall) of `fake` against `real` features with k-NN radius manifolds."""
    k = min(k, len(real) - 1, len(fake) - 1)
    if k < 1:
        raise ValueError("precision/recall need at least 2 real and 2 generated images")
    real, fake = real.double(), fake.double()

    def radii(x: torch.Tensor) -> torch.Tensor:  # distance to the k-th neighbour (0 is itself)
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    distances = torch.cdist(fake, real)  # [F, R]
    precision = (distances <= radii(real)[None]).any(dim=1).double().mean()
    recall = (radii(fake)[None] >= distances.T).any(dim=1).double().mean()
    return float(precision), float(recall)


def load_real_features(fid: FrechetInceptionDistance, features: torch.Tensor) -> None:
    """Fill a torchmetrics FID's real-image state from cached features (what update(real=True)
    would have accumulated), so the real images are never encoded again."""
    features = features.double().to(fid.real_features_sum.device)
    fid.real_features_sum = features.sum(dim=0)
    fid.real_features_cov_sum = features.T @ features
    fid.real_features_num_samples = torch.tensor(len(features), device=features.device)


def file_sha1(path: str | Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class GenerationMetrics:
    """Accumulates generated images (and their captions) batch by batch; `compute()` scores them
    against the reference features of real images made with the same feature model."""

    def __init__(
        self,
        features: ClipImageFeatures,
        reference: Reference,
        kid_subsets: int = 50,
        kid_subset_size: int = 1000,
        precision_recall_k: int | None = 3,
        inception: tuple[FrechetInceptionDistance, Reference] | None = None,
    ) -> None:
        self.features = features
        self.reference = reference
        self.fid = FrechetInceptionDistance(feature=features, reset_real_features=False)
        load_real_features(self.fid, reference.features)
        with warnings.catch_warnings():  # "will save all extracted features": bounded by config
            warnings.simplefilter("ignore", UserWarning)
            self.kid = KernelInceptionDistance(
                feature=features, subsets=kid_subsets, subset_size=kid_subset_size,
                reset_real_features=False,
            )  # fmt: skip
        self.kid.real_features.append(reference.features.float())
        self.kid_subset_size = kid_subset_size
        self.precision_recall_k = precision_recall_k
        self.inception = inception
        if inception is not None:
            load_real_features(inception[0], inception[1].features)
        self._fake: list[torch.Tensor] = []
        self._scores: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, images: torch.Tensor, captions: Sequence[str] | None = None) -> None:
        """Images [B, 3, H, W] in [-1, 1] (at the reference's size); captions for the CLIP score."""
        images = images.float()
        self.fid.update(images, real=False)
        self.kid.update(images, real=False)
        image_features = self.features(images)  # the batch FID just encoded: not recomputed
        self._fake.append(image_features.double().cpu())
        if captions is not None:
            text_features = self.features.encode_texts(captions).to(image_features.device)
            self._scores.append(clip_score(image_features, text_features).cpu())
        if self.inception is not None:
            self.inception[0].update(
                ((images + 1) * 127.5).round().clamp(0, 255).byte(), real=False
            )

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        fake = torch.cat(self._fake)
        real = self.reference.features
        out = {"fid_clip": float(self.fid.compute())}
        # KID's subsets may not hold more images than either side has
        self.kid.subset_size = min(self.kid_subset_size, len(real), len(fake))
        # KID draws its subsets from the global generator: fork it, so scores repeat and the
        # training run's own random stream is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            kid_mean, kid_std = self.kid.compute()
        out.update(kid_clip=float(kid_mean), kid_clip_std=float(kid_std))
        if self._scores:
            out["clip_score"] = float(torch.cat(self._scores).mean())
        if self.precision_recall_k:
            out["precision"], out["recall"] = manifold_precision_recall(
                real, fake, self.precision_recall_k
            )
        if self.inception is not None:
            out["fid_inception"] = float(self.inception[0].compute())
        return out


def inception_fid(
    weights_path: str | None,
    shards: str | Sequence[str],
    num_samples: int,
    image_size: int,
    cache_dir: str | Path | None = None,
) -> tuple[FrechetInceptionDistance, Reference] | None:
    """torchmetrics' Inception FID with its real statistics cached like the CLIP ones, or None
    (with a message) when no weights file is given."""
    if not weights_path:
        log.info(INCEPTION_SKIPPED)
        return None
    if not Path(weights_path).is_file():
        raise FileNotFoundError(
            f"eval.feature_extractor_weights_path={weights_path!r}: no such file"
        )
    try:
        fid = FrechetInceptionDistance(
            feature=2048, reset_real_features=False, feature_extractor_weights_path=weights_path
        )
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"eval.feature_extractor_weights_path is set but Inception FID needs torch-fidelity: "
            f"pip install 'unclip[inception]' ({error})"
        ) from error

    def inception_features(images: torch.Tensor) -> torch.Tensor:
        return fid.inception(((images + 1) * 127.5).round().clamp(0, 255).byte())

    facts = {"feature_model": "inception-v3-compat-2048", "weights_sha1": file_sha1(weights_path)}
    reference = reference_features(
        shards, inception_features, facts, num_samples, image_size, cache_dir=cache_dir
    )
    return fid, reference


def score_images(
    images: torch.Tensor,
    captions: Sequence[str] | None,
    features: ClipImageFeatures,
    reference: Reference,
    batch_size: int = 64,
    **options,
) -> dict[str, float]:
    """Every image metric of a set of generated images [N, 3, H, W] in one call."""
    metrics = GenerationMetrics(features, reference, **options)
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        metrics.update(images[start:stop], None if captions is None else captions[start:stop])
    return metrics.compute()
