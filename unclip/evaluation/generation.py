"""Generate images for a fixed validation subset and score them: the body of every image evaluation
(the training callback, `python -m unclip.sampling.evaluate`, the demo).

The stages come in as plain callables (a decoder's `sample`, a prior's `sample`, upsamplers'
`upsample`), so this module never needs to know which LightningModule made them. The decoder is
fed the prior's samples when a prior is given, else the true image embeddings of the subset.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from unclip.data.samples import read_samples
from unclip.evaluation.features import ClipImageFeatures
from unclip.evaluation.image_metrics import GenerationMetrics, inception_fid
from unclip.evaluation.prior_metrics import prior_metrics
from unclip.evaluation.reference import reference_features

# decode(img_emb [B, D], captions, generator) -> images [B, 3, H, W] in [-1, 1]
DecodeFn = Callable[[torch.Tensor, list[str], torch.Generator], torch.Tensor]
# prior(captions, txt_emb [B, D], generator) -> sampled img_emb [B, D]
PriorFn = Callable[[list[str], torch.Tensor, torch.Generator], torch.Tensor]
# upsample(images, generator) -> larger images
UpsampleFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def stage_role(module: Any) -> str | None:
    """ "upsampler", "decoder" or "prior" by what a stage offers (None: nothing that generates)."""
    if callable(getattr(module, "upsample", None)):
        return "upsampler"
    if not callable(getattr(module, "sample", None)):
        return None
    return "decoder" if "image" in getattr(module, "data_fields", []) else "prior"


@dataclass
class EvalSubset:
    """The first `num_samples` captions of a shard set with their true embeddings."""

    captions: list[str]
    img_emb: torch.Tensor
    txt_emb: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.captions)


def read_subset(shards: str | Sequence[str], num_samples: int, with_txt_emb: bool) -> EvalSubset:
    fields = ["txt", "img_emb"] + (["txt_emb"] if with_txt_emb else [])
    batch = read_samples(shards, fields, num_samples, config_key="eval.shards")
    return EvalSubset(list(batch["txt"]), batch["img_emb"].float(), batch.get("txt_emb"))


@dataclass
class Generated:
    images: torch.Tensor  # [N, 3, H, W] in [-1, 1], on the CPU
    sampled_emb: torch.Tensor | None  # the prior's samples, when a prior ran
    seconds: float


@torch.no_grad()
def generate(
    subset: EvalSubset,
    decode: DecodeFn,
    prior: PriorFn | None = None,
    upsamplers: Sequence[UpsampleFn] = (),
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Generated:
    """One image per caption of the subset, from fixed seeds (the same noise at every evaluation)."""
    if prior is not None and subset.txt_emb is None:
        raise ValueError("generating through a prior needs txt_emb in eval.shards")
    started = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(int(seed))
    images, sampled = [], []
    for start in range(0, len(subset), batch_size):
        captions = subset.captions[start : start + batch_size]
        img_emb = subset.img_emb[start : start + batch_size]
        if prior is not None:
            img_emb = prior(captions, subset.txt_emb[start : start + batch_size], generator)
            sampled.append(img_emb.float().cpu())
        batch = decode(img_emb, captions, generator)
        for upsample in upsamplers:
            batch = upsample(batch, generator)
        images.append(batch.float().cpu())
    return Generated(
        torch.cat(images), torch.cat(sampled) if sampled else None, time.perf_counter() - started
    )


@dataclass
class EvalSettings:
    """What an evaluation measures against; every field is an `eval.*` config key."""

    shards: str | list[str]
    reference_samples: int = 1000
    kid_subsets: int = 50
    kid_subset_size: int = 1000
    precision_recall_k: int | None = 3
    feature_extractor_weights_path: str | None = None
    cache_dir: str | None = None


class Evaluator:
    """The feature model and cached real statistics for one image size; `score` many times."""

    def __init__(self, features: ClipImageFeatures, settings: EvalSettings, image_size: int):
        self.features = features
        self.settings = settings
        self.image_size = int(image_size)
        self.reference = reference_features(
            settings.shards,
            features,
            features.facts,
            settings.reference_samples,
            self.image_size,
            cache_dir=settings.cache_dir,
        )
        self.inception = inception_fid(
            settings.feature_extractor_weights_path,
            settings.shards,
            settings.reference_samples,
            self.image_size,
            settings.cache_dir,
        )

    def score(
        self, generated: Generated, subset: EvalSubset, batch_size: int = 64
    ) -> dict[str, float]:
        """Image metrics of the generated images, and the prior metric set when a prior ran."""
        images = generated.images
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"generated images are {tuple(images.shape[-2:])}, the reference statistics are "
                f"of {self.image_size}x{self.image_size} images"
            )
        metrics = GenerationMetrics(
            self.features,
            self.reference,
            kid_subsets=self.settings.kid_subsets,
            kid_subset_size=self.settings.kid_subset_size,
            precision_recall_k=self.settings.precision_recall_k,
            inception=self._fresh_inception(),
        )
        started = time.perf_counter()
        for start in range(0, len(images), batch_size):
            metrics.update(
                images[start : start + batch_size], subset.captions[start : start + batch_size]
            )
        out = metrics.compute()
        if generated.sampled_emb is not None and subset.txt_emb is not None:
            fit = prior_metrics(generated.sampled_emb, subset.img_emb, subset.txt_emb)
            out.update({f"prior_{k}": float(v) for k, v in fit.items()})
        out["generation_seconds"] = generated.seconds
        out["scoring_seconds"] = time.perf_counter() - started
        return out

    def _fresh_inception(self) -> Any:
        if self.inception is None:
            return None
        fid, reference = self.inception
        fid.reset()  # keeps the real statistics (reset_real_features=False), drops the fakes
        return fid, reference
