"""The autoregressive prior's network: a causal transformer over

    [caption token states..., z_t, dot-product code, code_0, ..., code_{P-2}]

whose outputs from the dot-product token onwards predict code_0 ... code_{P-1} (the quantised
principal components of z_i, see unclip.models.ar_prior_tokenizer). The caption, z_t and the dot
product form the prefix the paper conditions on; dropping the text (classifier-free guidance)
replaces all three with learned null tokens, since a dot product with no caption means nothing.

Sampling (`generate`) keeps a key/value cache, so each new code costs one token's forward pass, and
runs the conditional and unconditional rows as one doubled batch when guided (the stage passes
the function that combines their logits: unclip.diffusion.guidance).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unclip.nn.caption_encoder import CaptionEncoder
from unclip.nn.transformer import KVCache, Prefix, Transformer, TransformerConfig


class ARPriorNetConfig(TransformerConfig):
    """`model.net` of the AR prior: its transformer's sizes."""


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Keep the `top_k` most likely codes and the smallest set whose probability reaches `top_p`
    (nucleus sampling); the rest get -inf. The most likely code always survives."""
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before it
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One code per row of logits [B, K]; temperature 0 takes the most likely code."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class ARPriorNet(nn.Module):
    """Predicts the codes of z_i from the caption, z_t and the dot-product code.

    The caption encoder is built by the stage. The code vocabulary is shared by all positions (a
    code is a quantile rank of its component; the position says which component).
    """

    def __init__(
        self,
        embed_dim: int,
        num_components: int,
        num_buckets: int,
        dot_buckets: int,
        config: ARPriorNetConfig | None = None,
        /,
        *,
        caption_encoder: CaptionEncoder | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        config = config if config is not None else ARPriorNetConfig(**settings)
        self.config = config
        width, layers, heads = config.width, config.layers, config.heads
        mlp_ratio, dropout = config.mlp_ratio, config.dropout
        self.embed_dim = embed_dim
        self.num_components = num_components
        self.num_buckets = num_buckets
        self.dot_buckets = dot_buckets
        self.layers = layers
        self.caption_encoder = caption_encoder if caption_encoder is not None else CaptionEncoder()
        self.caption_length = self.caption_encoder.context_length
        self.prefix_length = self.caption_length + 2  # captions, z_t, dot-product code
        self.caption_proj = nn.Linear(self.caption_encoder.out_dim, width)
        self.txt_emb_proj = nn.Linear(embed_dim, width)
        self.null_caption = nn.Parameter(torch.randn(width) * 0.02)
        self.null_txt_emb = nn.Parameter(torch.randn(width) * 0.02)
        self.dot_embedding = nn.Embedding(dot_buckets + 1, width)  # the last one: text dropped
        self.code_embedding = nn.Embedding(num_buckets, width)
        length = self.prefix_length + num_components - 1
        self.positional_embedding = nn.Parameter(torch.randn(length, width) * 0.01)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, dropout)
        self.ln_final = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_buckets)

    # ---- the prefix ------------------------------------------------------------------------
    def prefix(
        self,
        tokens: torch.Tensor,
        txt_emb: torch.Tensor,
        dot_codes: torch.Tensor,
        drop_text: torch.Tensor | None = None,
    ) -> Prefix:
        """Caption states, z_t and the dot code as tokens [B, L+2, W]. Rows where `drop_text` is
        True become the null prefix: one null caption token (the rest masked), null z_t and the
        null dot code."""
        states, _, caption_mask = self.caption_encoder(tokens)
        caption = self.caption_proj(states)
        txt = self.txt_emb_proj(txt_emb.to(caption.dtype)).unsqueeze(1)
        if drop_text is not None:
            drop = drop_text.view(-1, 1, 1)
            first_only = torch.zeros_like(caption_mask)
            first_only[:, 0] = True
            caption = torch.where(drop, self.null_caption.expand_as(caption), caption)
            caption_mask = torch.where(drop_text.view(-1, 1), first_only, caption_mask)
            txt = torch.where(drop, self.null_txt_emb.view(1, 1, -1), txt)
            dot_codes = torch.where(drop_text, self.dot_buckets, dot_codes)
        dot = self.dot_embedding(dot_codes).unsqueeze(1)
        mask = F.pad(caption_mask, (0, 2), value=True)
        return Prefix(torch.cat([caption, txt, dot], dim=1), mask)

    # ---- training ----------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        txt_emb: torch.Tensor,
        dot_codes: torch.Tensor,
        codes: torch.Tensor,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits [B, P, num_buckets] for codes [B, P]."""
        prefix = self.prefix(tokens, txt_emb, dot_codes, drop_text)
        x = torch.cat([prefix.states, self.code_embedding(codes[:, :-1])], dim=1)
        x = x + self.positional_embedding[: x.shape[1]]
        length = x.shape[1]
        mask = F.pad(prefix.mask, (0, length - prefix.mask.shape[1]), value=True)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        x = self.transformer(x, (causal & mask[:, None, :]).unsqueeze(1))
        return self.head(self.ln_final(x[:, self.prefix_length - 1 :]))

    # ---- sampling ----------------------------------------------------------------------------
    def _cached_forward(
        self, x: torch.Tensor, cache: KVCache, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """Last-position logits [B, K] after feeding tokens x [B, T, W] through the cache."""
        start, end = cache.length, cache.length + x.shape[1]
        x = x + self.positional_embedding[start:end]
        query_pos = torch.arange(start, end, device=x.device).unsqueeze(1)
        key_pos = torch.arange(end, device=x.device).unsqueeze(0)
        mask = (key_pos <= query_pos).unsqueeze(0) & key_mask[:, None, :end]  # [B, T, end]
        x = self.transformer(x, mask[:, None], cache)
        return self.head(self.ln_final(x[:, -1]))

    @torch.no_grad()
    def generate(
        self,
        tokens: torch.Tensor,
        txt_emb: torch.Tensor,
        dot_codes: torch.Tensor,
        guidance: Callable[[torch.Tensor], torch.Tensor] | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample codes [B, P]. With `guidance` the rows run twice, the second time with the text
        dropped, and `guidance(logits [2B, K]) -> [B, K]` combines them (classifier-free
        guidance). `use_cache` False re-runs the whole sequence for every code."""
        batch = tokens.shape[0]
        guided = guidance is not None
        drop = None
        if guided:
            tokens, txt_emb, dot_codes = (torch.cat([t, t]) for t in (tokens, txt_emb, dot_codes))
            drop = torch.arange(2 * batch, device=tokens.device) >= batch
        codes = torch.zeros(
            len(tokens), self.num_components, dtype=torch.long, device=tokens.device
        )
        if use_cache:
            prefix = self.prefix(tokens, txt_emb, dot_codes, drop)
            total = self.prefix_length + self.num_components - 1
            cache = KVCache()
            key_mask = F.pad(prefix.mask, (0, total - prefix.mask.shape[1]), value=True)
            logits = self._cached_forward(prefix.states, cache, key_mask)
        for position in range(self.num_components):
            if not use_cache:  # the causal mask keeps the codes not drawn yet out of the logits
                logits = self(tokens, txt_emb, dot_codes, codes, drop)[:, position]
            if guided:
                logits = guidance(logits.float())
            code = sample_logits(logits, temperature, top_k, top_p, generator)
            codes[:, position] = code.repeat(2) if guided else code
            if use_cache and position + 1 < self.num_components:
                step = self.code_embedding(codes[:, position])[:, None]
                logits = self._cached_forward(step, cache, key_mask)
        return codes[:batch]
