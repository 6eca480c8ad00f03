"""Text -> image with trained checkpoints: CLIP text embedding -> prior -> decoder -> upsamplers.

    pipe = UnclipPipeline.load(clip="runs/demo-clip/checkpoints/last.ckpt",
                               prior="runs/demo-prior_diffusion/checkpoints/last.ckpt",
                               decoder="runs/demo-decoder/checkpoints/last.ckpt",
                               upsamplers=["runs/demo-upsampler/checkpoints/last.ckpt"])
    out = pipe.text_to_image(["a red circle"] * 4, prior_kwargs, decoder_kwargs, [upsampler_kwargs])

Each stage's sampling settings are passed through to its module's own `sample` / `upsample`, so the
pipeline never hard-codes a stage's hyperparameters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from unclip.clip import ClipBundle, encode_images, encode_texts, load_clip
from unclip.nn.unet import UNet
from unclip.training.module import load_module

log = logging.getLogger(__name__)

# The prior's kind picks its settings block in conf/sample.yaml (prior.diffusion / prior.ar).
PRIOR_KINDS = {"DiffusionPriorModule": "diffusion", "ARPriorModule": "ar"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, of the wrong stage, or incompatible with another one."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def use_ema_weights(module: nn.Module, enabled: bool) -> bool:
    """Sample with the EMA weights (the default) or the raw trained ones; returns whether EMA
    weights are in use. Modules expose their sampling network as `eval_net`, the EMA copy when
    there is one; dropping the EMA makes `eval_net` the raw network."""
    has_ema = getattr(module, "ema", None) is not None
    if has_ema and not enabled:
        module.ema = None
    return has_ema and enabled


def _load_stage(path: str | Path, role: str, needs: Sequence[str], device: torch.device) -> Any:
    """Load a checkpoint for `role`, failing with the file name when it is absent or is not a
    checkpoint of a stage that offers the methods `needs`."""
    path = Path(path)
    if not path.exists():  # a file, or the folder of a sharded FSDP checkpoint
        raise CheckpointError(f"{role}.checkpoint={str(path)!r}: no such checkpoint file")
    try:
        module = load_module(path, map_location="cpu")
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"{role}.checkpoint={str(path)!r}: cannot load ({error})") from error
    missing = [name for name in needs if not callable(getattr(module, name, None))]
    if missing:
        raise CheckpointError(
            f"{role}.checkpoint={str(path)!r} holds a {type(module).__name__}, which has no "
            f"{', '.join(missing)}(): is it the checkpoint of another stage?"
        )
    return module.to(device).eval()


def embed_dim_of(module: nn.Module) -> int | None:
    dim = getattr(module, "embed_dim", None)
    return int(dim) if dim else None


def compile_unets(net: nn.Module, backend: str = "inductor") -> int:
    """Compile every UNet in `net` in place (`nn.Module.compile`: the weights and state_dict stay
    as they are). The first call at each new batch shape pays the compilation (tens of seconds on
    CPU), so it pays off for long sampling jobs only; returns how many UNets were compiled."""
    unets = [m for m in net.modules() if isinstance(m, UNet)]
    for unet in unets:
        unet.compile(dynamic=False, backend=backend)
    return len(unets)


@dataclass
class Samples:
    """What text_to_image produced: final images, the decoder's images and both embeddings."""

    images: torch.Tensor  # [B, 3, H, W] in [-1, 1], after every upsampler
    base_images: torch.Tensor  # [B, 3, h, w] the decoder's output
    img_emb: torch.Tensor  # [B, D] the prior's samples
    txt_emb: torch.Tensor  # [B, D] CLIP text embeddings of the captions


@dataclass
class UnclipPipeline:
    """A CLIP, an optional prior, a decoder and any number of upsamplers that fit together."""

    clip: ClipBundle
    decoder: Any
    prior: Any | None = None
    upsamplers: list[Any] = field(default_factory=list)
    paths: dict[str, Any] = field(default_factory=dict)
    ema: dict[str, bool] = field(default_factory=dict)

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        clip: str,
        decoder: str | Path,
        prior: str | Path | None = None,
        upsamplers: Sequence[str | Path] = (),
        device: str | torch.device | None = "auto",
        ema: bool = True,
        channels_last: bool = True,
        compile: bool = False,
    ) -> UnclipPipeline:
        """Load and check every stage; `ema` picks EMA or raw weights for every stage that has both;
        `channels_last` stores the decoder's and upsamplers' weights NHWC, which convolution kernels
        run faster on (bench/sampling_bench.py; identical results up to float rounding);
        `compile` compiles the sampling UNets (`compile_unets`) for long sampling jobs."""
        device = resolve_device(device)
        try:
            bundle = load_clip(str(clip), device=device)
        except (FileNotFoundError, ValueError) as error:
            raise CheckpointError(f"clip.checkpoint={str(clip)!r}: {error}") from error
        decoder_module = _load_stage(decoder, "decoder", ("sample", "invert"), device)
        prior_module = None if prior is None else _load_stage(prior, "prior", ("sample",), device)
        upsampler_modules = [
            _load_stage(path, f"upsamplers[{i}]", ("upsample",), device)
            for i, path in enumerate(upsamplers)
        ]
        paths = {
            "clip": str(clip),
            "decoder": str(decoder),
            "prior": None if prior is None else str(prior),
            "upsamplers": [str(p) for p in upsamplers],
        }
        stages = {"decoder": decoder_module, "prior": prior_module}
        stages.update({f"upsamplers[{i}]": m for i, m in enumerate(upsampler_modules)})
        ema_used = {name: use_ema_weights(m, ema) for name, m in stages.items() if m is not None}
        # either way explicitly: the UNet stages are built NHWC by default (their channels_last)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for module in (decoder_module, *upsampler_modules):
            module.to(memory_format=memory_format)
            if compile:
                compile_unets(module.eval_net)
        pipe = cls(bundle, decoder_module, prior_module, upsampler_modules, paths, ema_used)
        pipe.check()
        return pipe

    def check(self) -> None:
        """Fail, naming both files, when two stages disagree on the CLIP embedding size or when
        an upsampler does not take the previous stage's resolution."""
        clip_dim = int(self.clip.info["embed_dim"])
        for role, module in (("prior", self.prior), ("decoder", self.decoder)):
            dim = embed_dim_of(module) if module is not None else None
            if dim is not None and dim != clip_dim:
                raise CheckpointError(
                    f"{role}.checkpoint={self.paths.get(role)!r} was trained on {dim}-dim CLIP "
                    f"embeddings, but clip.checkpoint={self.paths.get('clip')!r} makes "
                    f"{clip_dim}-dim ones: train the {role} on shards embedded with this CLIP"
                )
        prior_dim = embed_dim_of(self.prior) if self.prior is not None else None
        decoder_dim = embed_dim_of(self.decoder)
        if prior_dim and decoder_dim and prior_dim != decoder_dim:
            raise CheckpointError(
                f"prior.checkpoint={self.paths['prior']!r} makes {prior_dim}-dim embeddings but "
                f"decoder.checkpoint={self.paths['decoder']!r} takes {decoder_dim}-dim ones"
            )
        size, source = self.decoder_size, f"decoder.checkpoint={self.paths['decoder']!r}"
        for i, upsampler in enumerate(self.upsamplers):
            low = getattr(upsampler, "low_res_size", None)
            where = f"upsamplers[{i}].checkpoint={self.paths['upsamplers'][i]!r}"
            if size is not None and low is not None and int(low) != int(size):
                raise CheckpointError(
                    f"{where} upsamples {low}x{low} images but {source} makes {size}x{size} ones"
                )
            size = getattr(upsampler, "image_size", None)
            source = where

    # ---- properties --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.clip.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return int(self.clip.info["embed_dim"])

    @property
    def decoder_size(self) -> int | None:
        size = getattr(self.decoder, "image_size", None)
        return int(size) if size else None

    @property
    def prior_kind(self) -> str | None:
        if self.prior is None:
            return None
        kind = PRIOR_KINDS.get(type(self.prior).__name__)
        if kind is None:
            raise CheckpointError(
                f"prior.checkpoint={self.paths.get('prior')!r} holds a "
                f"{type(self.prior).__name__}; known priors: {sorted(PRIOR_KINDS)}"
            )
        return kind

    @property
    def raw_embeddings(self) -> bool:
        """A prior that reads raw z_t (model.text_embedding=raw: Karlo's) puts the whole stack in
        raw CLIP space: captions and images are then embedded without L2 normalisation."""
        return getattr(self.prior, "text_embedding", None) == "raw"

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(int(seed))

    # ---- stages --------------------------------------------------------------------------------
    def encode_texts(self, captions: Sequence[str]) -> torch.Tensor:
        return encode_texts(
            self.clip.model, self.clip.tokenizer, list(captions), normalize=not self.raw_embeddings
        )

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings of [B, 3, H, W] images in [-1, 1]."""
        return encode_images(
            self.clip.model,
            self.clip.preprocess,
            images.to(self.device),
            normalize=not self.raw_embeddings,
        )

    @torch.no_grad()
    def sample_prior(
        self,
        captions: Sequence[str],
        txt_emb: torch.Tensor,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.prior is None:
            raise CheckpointError("text -> image needs a prior: set prior.checkpoint")
        return self.prior.sample(list(captions), txt_emb, generator=generator, **kwargs)

    @torch.no_grad()
    def decode(
        self,
        img_emb: torch.Tensor,
        captions: Sequence[str],
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Decoder images [B, 3, h, w] in [-1, 1] for image embeddings (and captions; "" drops one)."""
        return self.decoder.sample(
            img_emb.to(self.device), list(captions), noise=noise, generator=generator, **kwargs
        )

    def to_decoder_size(self, images: torch.Tensor) -> torch.Tensor:
        """Resize [B, 3, H, W] images to the decoder's resolution (for DDIM inversion)."""
        size = self.decoder_size
        images = images.to(self.device)
        if size is None or tuple(images.shape[-2:]) == (size, size):
            return images
        return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True).clamp(-1, 1)

    @torch.no_grad()
    def invert(
        self, images: torch.Tensor, img_emb: torch.Tensor, captions: Sequence[str], steps: int
    ) -> torch.Tensor:
        """x_T of the bipartite latent: DDIM inversion of images conditioned on their embeddings."""
        return self.decoder.invert(self.to_decoder_size(images), img_emb, list(captions), steps)

    @torch.no_grad()
    def upsample(
        self,
        images: torch.Tensor,
        settings: Sequence[dict[str, Any]],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Run every upsampler in turn; `settings` holds one kwargs dict per upsampler."""
        if len(settings) != len(self.upsamplers):
            raise ValueError(
                f"{len(settings)} upsampler settings for {len(self.upsamplers)} upsamplers"
            )
        for upsampler, kwargs in zip(self.upsamplers, settings, strict=True):
            images = upsampler.upsample(images, generator=generator, **kwargs)
        return images

    def text_to_image(
        self,
        captions: Sequence[str],
        prior_kwargs: dict[str, Any],
        decoder_kwargs: dict[str, Any],
        upsampler_kwargs: Sequence[dict[str, Any]],
        generator: torch.Generator | None = None,
        batch_size: int = 16,
        progress: bool = False,
    ) -> Samples:
        """One image per caption (repeat a caption for several), `batch_size` captions at a time."""
        parts: list[Samples] = []
        starts = range(0, len(captions), batch_size)
        for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress):
            batch = list(captions[start : start + batch_size])
            txt_emb = self.encode_texts(batch)
            img_emb = self.sample_prior(batch, txt_emb, generator, **prior_kwargs)
            base = self.decode(img_emb, batch, generator, **decoder_kwargs)
            images = self.upsample(base, upsampler_kwargs, generator)
            parts.append(Samples(images.cpu(), base.cpu(), img_emb.cpu(), txt_emb.cpu()))
        return Samples(
            *(torch.cat([getattr(p, f) for p in parts]) for f in Samples.__dataclass_fields__)
        )
