"""The decoder's network: GLIDE's text-conditional UNet with unCLIP's two CLIP-embedding paths.

As in the paper (section 2.1), the CLIP image embedding z_i is
  1. projected and added to the timestep embedding, and
  2. projected into `num_image_tokens` (4) extra context tokens, concatenated to the outputs of the
     decoder's own transformer text encoder over the caption;
every attention layer of the UNet attends to those context tokens together with its own keys and
values. As in GLIDE (and Karlo), the text encoder's pooled (EOT) state is added to the timestep
embedding too. Both additions go through the UNet's one conditioning vector: a linear map of the
concatenation [z_i, pooled] is the sum of a linear map of each.

Classifier-free guidance: `drop_image` swaps z_i for the null embedding (zeros, or a learned vector
with `null_image_embedding="learned"`); a dropped caption is the empty caption "" (GLIDE's choice),
tokenised like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from unclip.nn.caption_encoder import CaptionEncoder, CaptionEncoderConfig
from unclip.nn.unet import UNet, UNetConfig
from unclip.nn.unit_norm import unit_norm

NULL_IMAGE_EMBEDDINGS = ("zero", "learned")


@dataclass
class DecoderNetConfig:
    """`model.net` of the decoder. text: the caption encoder, or None for a decoder without
    captions. context_dim: width of the context tokens (default: the text encoder's).
    rescale_image_embedding: feed z_i / |z_i| * sqrt(embed_dim) (unit RMS, as DALLE2-pytorch's
    prior normalisation) instead of the raw embedding. text_proj_norm: always project the caption
    states to the context width and LayerNorm them (Karlo / diffusers' UnCLIPTextProjModel)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    text: CaptionEncoderConfig | None = None
    num_image_tokens: int = 4
    context_dim: int | None = None
    add_pooled_text: bool = True
    null_image_embedding: str = "zero"
    rescale_image_embedding: bool = True
    text_proj_norm: bool = False


class DecoderNet(nn.Module):
    """`forward(x_t, t, img_emb, tokens, drop_image=None) -> prediction` ([B, out_channels, H, W]).

    embed_dim: size of the CLIP image embeddings. The stage builds the caption encoder (None:
    no captions) and says the UNet's channels in and out and its image size.
    """

    def __init__(
        self,
        embed_dim: int,
        config: DecoderNetConfig | None = None,
        /,
        *,
        caption_encoder: CaptionEncoder | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        image_size: int = 64,
        **settings: Any,
    ) -> None:
        super().__init__()
        config = config if config is not None else DecoderNetConfig(**settings)
        self.config = config
        num_image_tokens, context_dim = config.num_image_tokens, config.context_dim
        add_pooled_text, null_image_embedding = config.add_pooled_text, config.null_image_embedding
        rescale_image_embedding = config.rescale_image_embedding
        if null_image_embedding not in NULL_IMAGE_EMBEDDINGS:
            raise ValueError(
                f"model.net.null_image_embedding={null_image_embedding!r}: choose one of "
                f"{NULL_IMAGE_EMBEDDINGS}"
            )
        self.embed_dim = embed_dim
        self.rescale_image_embedding = rescale_image_embedding
        self.text = caption_encoder
        text_dim = self.text.out_dim if self.text is not None else 0
        pooled_dim = self.text.pooled_dim if self.text is not None else 0
        self.add_pooled_text = add_pooled_text and self.text is not None
        width = context_dim or text_dim or 4 * config.unet.model_channels
        needs_proj = self.text is not None and (text_dim != width or config.text_proj_norm)
        self.text_proj = nn.Linear(text_dim, width) if needs_proj else None
        self.text_norm = nn.LayerNorm(width) if needs_proj and config.text_proj_norm else None
        self.image_tokens = nn.Linear(embed_dim, num_image_tokens * width)
        self.num_image_tokens = num_image_tokens
        self.context_dim = width
        cond_dim = embed_dim + (pooled_dim if self.add_pooled_text else 0)
        self.unet = UNet(
            config.unet,
            in_channels=in_channels,
            out_channels=out_channels,
            image_size=image_size,
            cond_dim=cond_dim,
            context_dim=width,
        )
        if null_image_embedding == "learned":
            self.null_image = nn.Parameter(torch.zeros(embed_dim))
        else:
            self.register_buffer("null_image", torch.zeros(embed_dim), persistent=False)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        if self.text is None:
            return torch.zeros(len(captions), 0, dtype=torch.long)
        # trimmed to the batch's longest caption: every attention layer then reads ~12 caption
        # tokens instead of context_length, the same result for less work (the encoders are causal)
        return self.text.trim(self.text.tokenize(captions))

    def condition(
        self, img_emb: torch.Tensor, tokens: torch.Tensor, drop_image: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cond [B, cond_dim], context [B, N, width], context_mask [B, N]) for the UNet: what
        stays fixed over a sampling chain, so samplers compute it once."""
        img_emb, image_context, image_mask = self._image_condition(img_emb, drop_image)
        if self.text is None:
            return img_emb, image_context, image_mask
        states, pooled, pad_mask = self.text(tokens.to(img_emb.device))
        return self._with_caption(img_emb, image_context, image_mask, states, pooled, pad_mask)

    def condition_on_states(
        self,
        img_emb: torch.Tensor,
        states: torch.Tensor,
        pooled: torch.Tensor,
        pad_mask: torch.Tensor,
        drop_image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`condition` from caption states [B, L, text.out_dim], pooled [B, text.pooled_dim] and
        mask [B, L] already computed (another encoder's, or a converter test's inputs)."""
        if self.text is None:
            raise ValueError("condition_on_states needs a decoder with captions (model.net.text)")
        img_emb, image_context, image_mask = self._image_condition(img_emb, drop_image)
        return self._with_caption(img_emb, image_context, image_mask, states, pooled, pad_mask)

    def _image_condition(
        self, img_emb: torch.Tensor, drop_image: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_i as fed, its context tokens, their mask)."""
        if img_emb.shape[-1] != self.embed_dim:
            raise ValueError(
                f"image embeddings of size {img_emb.shape[-1]}, but the decoder takes "
                f"{self.embed_dim} (model.embed_dim)"
            )
        img_emb = img_emb.to(self.null_image.dtype)
        if self.rescale_image_embedding:
            # unit-length CLIP embeddings have components of size 1/sqrt(D): give them unit RMS
            # (same direction) so freshly initialised projections see inputs of the usual scale
            img_emb = unit_norm(img_emb) * math.sqrt(self.embed_dim)
        if drop_image is not None:
            null = self.null_image.expand_as(img_emb)
            img_emb = torch.where(drop_image[:, None].to(img_emb.device), null, img_emb)
        batch = img_emb.shape[0]
        image_context = self.image_tokens(img_emb).view(batch, self.num_image_tokens, -1)
        image_mask = torch.ones(
            batch, self.num_image_tokens, dtype=torch.bool, device=img_emb.device
        )
        return img_emb, image_context, image_mask

    def _with_caption(
        self,
        img_emb: torch.Tensor,
        image_context: torch.Tensor,
        image_mask: torch.Tensor,
        states: torch.Tensor,
        pooled: torch.Tensor,
        pad_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.text_proj is not None:
            states = self.text_proj(states)
        if self.text_norm is not None:
            states = self.text_norm(states)
        cond = torch.cat([img_emb, pooled], dim=-1) if self.add_pooled_text else img_emb
        context = torch.cat([states.to(image_context.dtype), image_context], dim=1)
        return cond, context, torch.cat([pad_mask, image_mask], dim=1)

    def denoise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        conditioning: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        cond, context, context_mask = conditioning
        return self.unet(x_t, t, cond, context, context_mask)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        img_emb: torch.Tensor,
        tokens: torch.Tensor,
        drop_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.denoise(x_t, t, self.condition(img_emb, tokens, drop_image))
