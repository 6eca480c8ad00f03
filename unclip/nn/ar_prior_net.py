"""The autoregressive prior's network: a causal transformer over

    [caption token states..., z_t, dot-product code, code_0, ..., code_{P-2}]

whose outputs from the dot-product token onwards predict code_0 ... code_{P-1} (the quantised
principal components of z_i, see unclip.models.ar_prior_tokenizer). The caption, z_t and the dot
product form the prefix the paper conditions on; dropping the text (classifier-free guidance)
replaces all three with learned null tokens, since a dot product with no caption means nothing.

Sampling (`generate`) keeps a key/value cache, so each new code costs one token's forward pass, and
runs the conditional and unconditional rows as one doubled batch when guided.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unclip.nn.caption_encoder import CaptionEncoder
from unclip.nn.transformer import Transformer, TransformerBlock


@dataclass
class Prefix:
    """The conditioning tokens of a batch: states [B, L, W] and key mask [B, L] (True = real)."""

    states: torch.Tensor
    mask: torch.Tensor


class KVCache:
    """Keys and values of every layer for a whole sequence, filled as tokens arrive. Allocated at
    the first write, in the dtype attention runs in (bf16 under autocast)."""

    def __init__(self, layers: int, length: int) -> None:
        self.layers, self.max_length = layers, length
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0  # tokens already cached

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values [B, H, T, hd] of the new tokens; returns all of this layer's so far."""
        if self.keys is None:
            batch, heads, _, head_dim = keys.shape
            shape = (self.layers, batch, heads, self.max_length, head_dim)
            self.keys, self.values = keys.new_zeros(shape), values.new_zeros(shape)
        end = self.length + keys.shape[2]
        self.keys[layer, :, :, self.length : end] = keys
        self.values[layer, :, :, self.length : end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def cached_block(
    block: TransformerBlock,
    x: torch.Tensor,
    cache: KVCache,
    layer: int,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """`block(x)` for new tokens x [B, T, W] at positions cache.length ... + T, attending to the
    cached ones too. The same arithmetic as TransformerBlock.forward (whose attention has no cache),
    using the block's own weights; tests check both give the same logits."""
    attn = block.attn
    batch, new, width = x.shape
    q, k, v = attn.qkv(block.ln_attn(x)).view(batch, new, 3, attn.heads, -1).permute(2, 0, 3, 1, 4)
    keys, values = cache.write(layer, k, v)
    start, end = cache.length, cache.length + new
    query_pos = torch.arange(start, end, device=x.device).unsqueeze(1)
    key_pos = torch.arange(end, device=x.device).unsqueeze(0)
    mask = (key_pos <= query_pos).unsqueeze(0) & key_mask[:, None, :end]  # [B, T, end]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])
    x = x + attn.proj(out.transpose(1, 2).reshape(batch, new, width))
    return x + block.mlp(block.ln_mlp(x))


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

    `text_encoder` holds CaptionEncoder's arguments. The code vocabulary is shared by all
    positions (a code is a quantile rank of its component; the position says which component).
    """

    def __init__(
        self,
        embed_dim: int,
        num_components: int,
        num_buckets: int,
        dot_buckets: int,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        text_encoder: dict | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_components = num_components
        self.num_buckets = num_buckets
        self.dot_buckets = dot_buckets
        self.layers = layers
        self.caption_encoder = CaptionEncoder(**(text_encoder or {}))
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
        x = x + self.positional_embedding[cache.length : cache.length + x.shape[1]]
        for layer, block in enumerate(self.transformer.blocks):
            x = cached_block(block, x, cache, layer, key_mask)
        cache.length += x.shape[1]
        return self.head(self.ln_final(x[:, -1]))

    def can_cache(self) -> bool:
        """The cache calls each block's layers directly, which needs plain blocks: a block wrapped
        by FSDP (whose parameters are sharded outside its own forward) is run whole instead."""
        return all(type(block) is TransformerBlock for block in self.transformer.blocks)

    @torch.no_grad()
    def generate(
        self,
        tokens: torch.Tensor,
        txt_emb: torch.Tensor,
        dot_codes: torch.Tensor,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool | None = None,
    ) -> torch.Tensor:
        """Sample codes [B, P]. With guidance_scale != 1 the logits are
        uncond + scale * (cond - uncond), the unconditional rows having the text dropped;
        scale 0 is the unconditional model, scale 1 the conditional one. `use_cache` None: the
        key/value cache whenever `can_cache()`; False re-runs the whole sequence for every code."""
        batch = tokens.shape[0]
        guided = guidance_scale != 1.0
        drop = None
        if guided:
            tokens, txt_emb, dot_codes = (torch.cat([t, t]) for t in (tokens, txt_emb, dot_codes))
            drop = torch.arange(2 * batch, device=tokens.device) >= batch
        if use_cache is None:
            use_cache = self.can_cache()
        codes = torch.zeros(
            len(tokens), self.num_components, dtype=torch.long, device=tokens.device
        )
        if use_cache:
            prefix = self.prefix(tokens, txt_emb, dot_codes, drop)
            total = self.prefix_length + self.num_components - 1
            cache = KVCache(self.layers, total)
            key_mask = F.pad(prefix.mask, (0, total - prefix.mask.shape[1]), value=True)
            logits = self._cached_forward(prefix.states, cache, key_mask)
        for position in range(self.num_components):
            if not use_cache:  # the causal mask keeps the codes not drawn yet out of the logits
                logits = self(tokens, txt_emb, dot_codes, codes, drop)[:, position]
            if guided:
                cond, uncond = logits.float().chunk(2)
                logits = uncond + guidance_scale * (cond - uncond)
            code = sample_logits(logits, temperature, top_k, top_p, generator)
            codes[:, position] = code.repeat(2) if guided else code
            if use_cache and position + 1 < self.num_components:
                step = self.code_embedding(codes[:, position])[:, None]
                logits = self._cached_forward(step, cache, key_mask)
        return codes[:batch]
