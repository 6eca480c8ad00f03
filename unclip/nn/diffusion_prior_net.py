"""The diffusion prior's network: a decoder-only transformer that predicts the unnoised CLIP image
embedding from a caption, its CLIP text embedding, a timestep and the noised image embedding.

One causal sequence per sample, in the paper's order:

    [caption tokens (L) | z_t | timestep | x_t | query]  ->  output at `query` = predicted z_i (x0)

Caption padding is masked out as keys. Because the mask is causal and the caption and z_t come
first, their hidden states do not depend on the timestep or x_t: `PrefixCache` computes their keys
and values once per caption, so each sampling step runs the transformer over three tokens only.

Classifier-free guidance: `condition(..., drop=mask)` swaps a sample's caption for one learned null
token and its z_t for a learned null embedding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unclip.nn.caption_encoder import CaptionEncoder
from unclip.nn.transformer import (
    KVCache,
    Prefix,
    Transformer,
    TransformerConfig,
    causal_mask,
    timestep_embedding,
)

# timestep, noised embedding, query: the tokens after the (caption, z_t) prefix
TAIL_TOKENS = 3


class DiffusionPriorNetConfig(TransformerConfig):
    """`model.net` of the diffusion prior: its transformer's sizes."""


class TimestepEmbedding(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.width))


class DiffusionPriorNet(nn.Module):
    """`forward(x_t, t, tokens, txt_emb, drop=None) -> x0` with embeddings in the prior's
    normalised space; the caption encoder is built by the stage (a frozen CLIP is loaded there)."""

    def __init__(
        self,
        embed_dim: int,
        config: DiffusionPriorNetConfig | None = None,
        /,
        *,
        caption_encoder: CaptionEncoder | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        config = config if config is not None else DiffusionPriorNetConfig(**settings)
        self.config = config
        width, layers, heads = config.width, config.layers, config.heads
        mlp_ratio, dropout = config.mlp_ratio, config.dropout
        self.embed_dim = embed_dim
        self.width = width
        self.caption_encoder = caption_encoder if caption_encoder is not None else CaptionEncoder()
        self.context_length = self.caption_encoder.context_length
        self.caption_proj = nn.Linear(self.caption_encoder.out_dim, width)
        self.text_emb_proj = nn.Linear(embed_dim, width)
        self.time_embed = TimestepEmbedding(width)
        self.x_proj = nn.Linear(embed_dim, width)
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.null_caption = nn.Parameter(torch.randn(width) * 0.02)
        self.null_text_emb = nn.Parameter(torch.randn(width) * 0.02)
        self.positional_embedding = nn.Parameter(
            torch.randn(self.context_length + 1 + TAIL_TOKENS, width) * 0.01
        )
        self.transformer = Transformer(width, layers, heads, mlp_ratio, dropout)
        self.ln_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, embed_dim)

    # ---- the sequence --------------------------------------------------------------------------
    def condition(
        self, tokens: torch.Tensor, txt_emb: torch.Tensor, drop: torch.Tensor | None = None
    ) -> Prefix:
        """Caption tokens [B, L <= context_length] and z_t [B, D] -> the prefix; `drop[b]` True
        replaces sample b's caption and z_t by the learned nulls (classifier-free guidance)."""
        states, _, caption_mask = self.caption_encoder(tokens)
        return self.condition_on_states(states, caption_mask, txt_emb, drop)

    def condition_on_states(
        self,
        states: torch.Tensor,
        caption_mask: torch.Tensor,
        txt_emb: torch.Tensor,
        drop: torch.Tensor | None = None,
    ) -> Prefix:
        """`condition` from caption states [B, L, caption_encoder.out_dim] already computed."""
        caption = self.caption_proj(states)
        text_emb = self.text_emb_proj(txt_emb)[:, None]
        if drop is not None:
            batch, length = caption_mask.shape
            null_caption, null_mask = self._null_caption(batch, length, caption.device)
            caption = torch.where(drop[:, None, None], null_caption.to(caption.dtype), caption)
            caption_mask = torch.where(drop[:, None], null_mask, caption_mask)
            null_text = self.null_text_emb.to(text_emb.dtype)
            text_emb = torch.where(drop[:, None, None], null_text, text_emb)
        return self._prefix(caption, caption_mask, text_emb)

    def null_condition(self, batch_size: int, device: torch.device) -> Prefix:
        """The unconditional prefix: a learned null caption token and null z_t."""
        caption, caption_mask = self._null_caption(batch_size, 1, device)
        return self._prefix(caption, caption_mask, self.null_text_emb.expand(batch_size, 1, -1))

    def _null_caption(
        self, batch_size: int, length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        caption = self.null_caption.expand(batch_size, length, -1)
        mask = torch.zeros(batch_size, length, dtype=torch.bool, device=device)
        mask[:, 0] = True
        return caption, mask

    def _prefix(
        self, caption: torch.Tensor, caption_mask: torch.Tensor, text_emb: torch.Tensor
    ) -> Prefix:
        """Caption positions count from 0; z_t and the tail sit at fixed positions after the full
        context, so a trimmed caption (see CaptionEncoder.trim) changes nothing."""
        positions = self.positional_embedding
        caption = caption + positions[: caption.shape[1]]
        text_emb = text_emb + positions[self.context_length]
        ones = caption_mask.new_ones(len(caption_mask), 1)
        return Prefix(torch.cat([caption, text_emb], 1), torch.cat([caption_mask, ones], 1))

    def tail(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[B, 3, width]: timestep, noised embedding and query tokens with their positions."""
        tokens = torch.stack(
            [self.time_embed(t), self.x_proj(x_t), self.query.expand(len(x_t), -1)], dim=1
        )
        return tokens + self.positional_embedding[self.context_length + 1 :]

    def attention_mask(self, prefix_mask: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] boolean: causal, and no attending to caption padding."""
        keys = torch.cat([prefix_mask, prefix_mask.new_ones(len(prefix_mask), TAIL_TOKENS)], 1)
        causal = causal_mask(keys.shape[1], keys.device)
        return (causal[None] & keys[:, None, :])[:, None]

    # ---- forward passes ------------------------------------------------------------------------
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, prefix: Prefix) -> torch.Tensor:
        """The predicted unnoised embedding [B, D] for a conditioning prefix."""
        sequence = torch.cat([prefix.states, self.tail(x_t, t)], dim=1)
        hidden = self.transformer(sequence, self.attention_mask(prefix.mask))
        return self.out(self.ln_out(hidden[:, -1]))

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        tokens: torch.Tensor,
        txt_emb: torch.Tensor,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.denoise(x_t, t, self.condition(tokens, txt_emb, drop))

    @torch.no_grad()
    def cache(self, prefix: Prefix) -> PrefixCache:
        """Keys and values of the prefix at every layer, for many denoising steps (inference)."""
        return PrefixCache(self, prefix)


class PrefixCache:
    """The prefix's keys/values at every layer; `denoise(x_t, t)` runs only the three tail tokens.

    It computes exactly what the full causal pass computes at the tail positions (see tests),
    without dropout: for sampling only.
    """

    def __init__(self, net: DiffusionPriorNet, prefix: Prefix) -> None:
        self.net = net
        self.prefix_mask = prefix.mask
        self.cache = KVCache()
        keys = prefix.mask
        mask = (causal_mask(keys.shape[1], keys.device)[None] & keys[:, None, :])[:, None]
        net.transformer(prefix.states, mask, self.cache)
        self.cache.frozen = True
        # tail queries see every real prefix token and the tail causally
        tail = causal_mask(TAIL_TOKENS, keys.device)[None].expand(len(keys), -1, -1)
        prefix_part = keys[:, None, :].expand(-1, TAIL_TOKENS, -1)
        self.tail_mask = torch.cat([prefix_part, tail], dim=-1)[:, None]

    def __len__(self) -> int:
        return len(self.prefix_mask)

    @torch.no_grad()
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.net.transformer(self.net.tail(x_t, t), self.tail_mask, self.cache)
        return self.net.out(self.net.ln_out(x[:, -1]))
