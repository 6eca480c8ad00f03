"""The paper's image manipulations (section 3), through a loaded pipeline's decoder.

An image's bipartite latent is `(z_i, x_T)`: its CLIP embedding and the decoder noise that DDIM
inversion (conditioned on `z_i`) finds for it. Decoding `(z_i, x_T)` with DDIM eta=0 gives the image
back; changing one half while holding the other gives:

- variations:      `z_i` fixed, fresh noise, DDIM with eta > 0;
- interpolations:  `slerp(z_i1, z_i2, theta)` with `x_T` fixed (one random draw) or slerped too;
- text diffs:      `slerp(z_i, norm(z_t - z_t0), theta)` with the image's own `x_T`;
- PCA:             `z_i` projected on its first k principal components, the image's own `x_T`.

Input images carry no caption: the decoder gets "" (its caption-dropped condition) throughout.
Every function returns the decoder-resolution images followed by the upsamplers' output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from unclip.sampling.latents import PCA, slerp, text_diff
from unclip.sampling.pipeline import UnclipPipeline

NOISE_MODES = ("random", "inverted", "slerp")
NO_CAPTION = ""


@dataclass
class Manipulated:
    images: torch.Tensor  # [N, 3, H, W] after the upsamplers
    base_images: torch.Tensor  # [N, 3, h, w] the decoder's output
    img_emb: torch.Tensor  # [N, D] the embeddings decoded
    noise: torch.Tensor | None  # [N, 3, h, w] the x_T used, when fixed by the manipulation


def _random_noise(
    pipe: UnclipPipeline, count: int, generator: torch.Generator | None
) -> torch.Tensor:
    size = pipe.decoder_size
    if size is None:
        raise ValueError("the decoder does not say its image_size: cannot draw x_T")
    channels = int(getattr(pipe.decoder, "channels", 3))
    noise = torch.randn(1, channels, size, size, generator=generator, device=pipe.device)
    return noise.expand(count, -1, -1, -1).contiguous()


def _finish(
    pipe: UnclipPipeline,
    img_emb: torch.Tensor,
    noise: torch.Tensor | None,
    decoder_kwargs: dict[str, Any],
    upsampler_kwargs: Sequence[dict[str, Any]],
    generator: torch.Generator | None,
) -> Manipulated:
    captions = [NO_CAPTION] * len(img_emb)
    base = pipe.decode(img_emb, captions, generator, noise=noise, **decoder_kwargs)
    images = pipe.upsample(base, upsampler_kwargs, generator)
    return Manipulated(
        images.cpu(), base.cpu(), img_emb.cpu(), None if noise is None else noise.cpu()
    )


def embed_and_invert(
    pipe: UnclipPipeline, images: torch.Tensor, inversion_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bipartite latents `(z_i, x_T)` of [B, 3, H, W] images in [-1, 1]."""
    img_emb = pipe.encode_images(images)
    x_t = pipe.invert(images, img_emb, [NO_CAPTION] * len(images), inversion_steps)
    return img_emb, x_t


@torch.no_grad()
def reconstruct(
    pipe: UnclipPipeline,
    images: torch.Tensor,
    *,
    inversion_steps: int,
    decoder_kwargs: dict[str, Any],
    upsampler_kwargs: Sequence[dict[str, Any]] = (),
) -> Manipulated:
    """Decode each image's own bipartite latent: with DDIM eta=0 and matching steps this gives the
    image back (the check that inversion works)."""
    img_emb, x_t = embed_and_invert(pipe, images, inversion_steps)
    return _finish(pipe, img_emb, x_t, decoder_kwargs, upsampler_kwargs, None)


@torch.no_grad()
def variations(
    pipe: UnclipPipeline,
    image: torch.Tensor,
    count: int,
    *,
    decoder_kwargs: dict[str, Any],
    upsampler_kwargs: Sequence[dict[str, Any]] = (),
    generator: torch.Generator | None = None,
) -> Manipulated:
    """`count` images sharing one image's CLIP embedding, each from fresh noise; `decoder_kwargs`
    should ask for DDIM with eta > 0 (the paper uses 1.0)."""
    img_emb = pipe.encode_images(image.unsqueeze(0)).expand(count, -1).contiguous()
    return _finish(pipe, img_emb, None, decoder_kwargs, upsampler_kwargs, generator)


@torch.no_grad()
def interpolate(
    pipe: UnclipPipeline,
    image_a: torch.Tensor,
    image_b: torch.Tensor,
    thetas: Sequence[float],
    *,
    noise: str = "random",
    inversion_steps: int = 50,
    decoder_kwargs: dict[str, Any],
    upsampler_kwargs: Sequence[dict[str, Any]] = (),
    generator: torch.Generator | None = None,
) -> Manipulated:
    """Decode `slerp(z_a, z_b, theta)` for each theta. `noise`: "random" holds one random x_T along
    the path (the paper's figure 4), "inverted" holds image a's x_T, "slerp" slerps the two images'
    x_T as well (then theta=0 and 1 reconstruct the two images)."""
    if noise not in NOISE_MODES:
        raise ValueError(f"interpolate.noise must be one of {NOISE_MODES}, got {noise!r}")
    pair = torch.stack([image_a, image_b])
    theta = torch.tensor(list(thetas), dtype=torch.float32, device=pipe.device)
    count = len(theta)
    if noise == "random":
        emb = pipe.encode_images(pair)
        x_t = _random_noise(pipe, count, generator)
    else:
        emb, inverted = embed_and_invert(pipe, pair, inversion_steps)
        if noise == "inverted":
            x_t = inverted[:1].expand(count, -1, -1, -1).contiguous()
        else:
            x_t = slerp(
                inverted[:1].expand(count, -1, -1, -1),
                inverted[1:].expand(count, -1, -1, -1),
                theta,
            )
    z = slerp(emb[:1].expand(count, -1), emb[1:].expand(count, -1), theta)
    return _finish(pipe, z, x_t, decoder_kwargs, upsampler_kwargs, generator)


@torch.no_grad()
def text_diffs(
    pipe: UnclipPipeline,
    image: torch.Tensor,
    caption: str,
    target: str,
    thetas: Sequence[float],
    *,
    inversion_steps: int = 50,
    decoder_kwargs: dict[str, Any],
    upsampler_kwargs: Sequence[dict[str, Any]] = (),
) -> Manipulated:
    """Turn an image (described by `caption`) toward `target`: decode
    `slerp(z_i, norm(z_t(target) - z_t(caption)), theta)` with the image's own x_T held fixed."""
    img_emb, x_t = embed_and_invert(pipe, image.unsqueeze(0), inversion_steps)
    current, goal = pipe.encode_texts([caption, target])
    count = len(thetas)
    theta = torch.tensor(list(thetas), dtype=torch.float32, device=pipe.device)
    z = text_diff(img_emb.expand(count, -1), goal, current, theta)
    return _finish(
        pipe, z, x_t.expand(count, -1, -1, -1).contiguous(), decoder_kwargs, upsampler_kwargs, None
    )


@torch.no_grad()
def pca_reconstructions(
    pipe: UnclipPipeline,
    image: torch.Tensor,
    pca: PCA,
    ks: Sequence[int],
    *,
    renormalize: bool = True,
    inversion_steps: int = 50,
    decoder_kwargs: dict[str, Any],
    upsampler_kwargs: Sequence[dict[str, Any]] = (),
) -> Manipulated:
    """Decode the image's embedding kept to its first k principal components, for each k, with
    the image's own x_T: what each added dimension of CLIP's space encodes."""
    img_emb, x_t = embed_and_invert(pipe, image.unsqueeze(0), inversion_steps)
    z = torch.cat([pca.project(img_emb, k, renormalize=renormalize) for k in ks])
    count = len(ks)
    return _finish(
        pipe, z, x_t.expand(count, -1, -1, -1).contiguous(), decoder_kwargs, upsampler_kwargs, None
    )
