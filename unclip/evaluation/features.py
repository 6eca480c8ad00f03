"""The feature model of the image metrics: a CLIP image tower as a torchmetrics feature module.

FID/KID "on CLIP features" need one named CLIP for every run they compare: by default the CLIP that
embedded the run's shards (their meta.json says which), else any `unclip.clip.load_clip` spec (an
open_clip name and tag, a local open_clip file `path.pt:ARCH`, or our `model=clip` checkpoint).
`fingerprint` identifies the weights, not just the name, so a retrained `last.ckpt` under the same
path invalidates every statistic computed with the old one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from unclip.clip import ClipBundle, clip_pixels, encode_texts, load_clip
from unclip.data.format import read_meta
from unclip.data.shards import expand_shards, shard_dir


def shards_clip_spec(shards: str | Sequence[str], config_key: str = "eval.shards") -> str:
    """The CLIP spec recorded in the shard set's meta.json (the default feature model)."""
    folder = shard_dir(expand_shards(shards, config_key))
    meta = read_meta(folder) if folder is not None else None
    if not meta or not meta.get("clip"):
        raise ValueError(
            f"{config_key}={shards!r} has no meta.json naming its CLIP: set eval.feature_model "
            f"to a CLIP spec (e.g. ViT-B-32:openai or /path/weights.pt:ARCH)"
        )
    return str(meta["clip"])


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-1 over every parameter and buffer (names, shapes, bytes): changes when the weights do."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


class ClipImageFeatures(nn.Module):
    """[B, 3, H, W] images in [-1, 1] -> [B, D] CLIP image embeddings on the sphere of radius
    sqrt(D) (unit RMS per dimension): KID's default kernel (x.y / D + 1)^3 is then a function of the
    cosine; on unit-norm vectors it is nearly constant and KID could not tell images apart.

    `num_features` spares torchmetrics its probe image. FID, KID, CLIP score and precision/recall
    all ask for the features of the same batch: the last batch's are kept, so the tower runs once.
    """

    def __init__(self, bundle: ClipBundle) -> None:
        super().__init__()
        self.clip = bundle.model.eval().requires_grad_(False)
        self.tokenizer = bundle.tokenizer
        self.spec = str(bundle.info.get("spec"))
        self.num_features = int(bundle.info["embed_dim"])
        self.fingerprint = weights_fingerprint(self.clip)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def train(self, mode: bool = True) -> ClipImageFeatures:
        return super().train(False)  # a judge never trains, whatever its owner does

    @property
    def facts(self) -> dict[str, str | int]:
        return {
            "feature_model": self.spec,
            "weights_sha1": self.fingerprint,
            "dim": self.num_features,
        }

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is images:
            return self._last[1]
        device = next(self.clip.parameters()).device
        pixels = clip_pixels(images.to(device).float(), self.clip)
        embeddings = self.clip.encode_image(pixels).float()
        features = torch.nn.functional.normalize(embeddings, dim=-1) * self.num_features**0.5
        self._last = (images, features)
        return features

    def encode_texts(self, captions: Sequence[str]) -> torch.Tensor:
        return encode_texts(self.clip, self.tokenizer, list(captions))


def load_features(
    spec: str | None, shards: str | Sequence[str], device: str | torch.device = "cpu"
) -> ClipImageFeatures:
    """The feature model named by `spec`, or by the shards' meta.json when `spec` is None."""
    spec = spec or shards_clip_spec(shards)
    if spec.endswith(".ckpt") and not Path(spec).is_file():
        raise FileNotFoundError(f"eval.feature_model={spec!r}: no such checkpoint file")
    try:
        bundle = load_clip(spec, device=device)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        raise ValueError(f"eval.feature_model={spec!r}: cannot load ({error})") from error
    return ClipImageFeatures(bundle)
