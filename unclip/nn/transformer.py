"""Pre-LayerNorm transformer blocks shared by the priors and the text encoders, with the one
attention (optionally over a key/value cache) and the one sinusoidal timestep embedding.

Attention goes through `F.scaled_dot_product_attention`, so flash / memory-efficient kernels are used
whenever the device offers them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

OPENCLIP_VOCAB_SIZE = 49408


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of (possibly fractional) diffusion timesteps [B], as in
    guided-diffusion: the UNet's and the diffusion prior's."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class KVCache:
    """Keys and values [B, heads, S, head_dim] of every layer for the tokens run so far, so each
    new token costs one token's pass (the AR prior's codes). Once `frozen`, later tokens attend
    to the cached ones without being added: a fixed prefix shared by many continuations (the
    diffusion prior's caption, reused at every denoising step)."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.frozen = False

    @property
    def length(self) -> int:
        """Tokens cached (read it before a forward pass: layers extend the cache in turn)."""
        return self.keys[0].shape[2] if self.keys else 0

    def extend(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys/values of `layer` followed by the new ones; stored unless frozen."""
        if layer < len(self.keys):
            keys = torch.cat([self.keys[layer], keys], dim=2)
            values = torch.cat([self.values[layer], values], dim=2)
        if not self.frozen:
            if layer < len(self.keys):
                self.keys[layer], self.values[layer] = keys, values
            else:
                self.keys.append(keys)
                self.values.append(values)
        return keys, values


@dataclass
class Prefix:
    """Conditioning tokens at the start of a sequence: states [B, L, width] and which are real
    tokens [B, L] (True = may be attended to)."""

    states: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.states.shape[0]

    @staticmethod
    def cat(prefixes: list[Prefix]) -> Prefix:
        """Stack prefixes along the batch; shorter ones get masked-out padding (which no token
        attends to, so it changes nothing)."""
        length = max(p.states.shape[1] for p in prefixes)
        states = [F.pad(p.states, (0, 0, 0, length - p.states.shape[1])) for p in prefixes]
        masks = [F.pad(p.mask, (0, length - p.mask.shape[1]), value=False) for p in prefixes]
        return Prefix(torch.cat(states), torch.cat(masks))

    def repeat_interleave(self, repeats: int) -> Prefix:
        return Prefix(
            self.states.repeat_interleave(repeats, dim=0),
            self.mask.repeat_interleave(repeats, dim=0),
        )


@dataclass
class TransformerConfig:
    """The sizes of a stack of blocks: what `model.net` of either prior holds."""

    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x [B, T, width]; with a cache, x are the tokens after the cached ones and `attn_mask`
        is [B, 1, T, cached + T]."""
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, width: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, mult * width),
            nn.GELU(),
            nn.Linear(mult * width, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), attn_mask, cache, layer)
        return x + self.mlp(self.ln_mlp(x))


class Transformer(nn.Module):
    """A stack of blocks; `attn_mask` is a boolean [L, L] or [B, 1, L, L] mask (True = may attend).
    With a `cache` the input continues the cached tokens (see KVCache)."""

    def __init__(
        self, width: int, layers: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, mlp_ratio, dropout) for _ in range(layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        for layer, block in enumerate(self.blocks):
            x = block(x, attn_mask, cache, layer)
        return x


def causal_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean lower-triangular mask: position i attends to positions <= i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def padding_mask_from_tokens(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """True for real tokens. open_clip pads with 0 after the EOT token."""
    return tokens != pad_id


class TextTransformer(nn.Module):
    """A small causal text encoder over open_clip BPE tokens, as GLIDE and the unCLIP priors use.

    Returns per-token states (for cross-attention or prefix tokens), the state at the EOT token as a
    pooled summary, and the mask of real tokens.
    """

    def __init__(
        self,
        context_length: int,
        width: int,
        layers: int,
        heads: int,
        vocab_size: int = OPENCLIP_VOCAB_SIZE,
        dropout: float = 0.0,
    ) -> None:
        """Sizes come from the caller's config (CaptionEncoderConfig holds the defaults)."""
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.transformer = Transformer(width, layers, heads, dropout=dropout)
        self.ln_final = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens [B, L] with L <= context_length: trimmed padding leaves the real tokens' states
        unchanged (the mask is causal) and makes the sequence shorter."""
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"at most {self.context_length} tokens per caption, got {tokens.shape[1]}"
            )
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.ln_final(self.transformer(x, causal_mask(tokens.shape[1], tokens.device)))
        eot_index = tokens.argmax(dim=-1)  # the EOT id is the largest in the vocabulary
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_index]
        return x, pooled, padding_mask_from_tokens(tokens)
