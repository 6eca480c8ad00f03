"""Pre-LayerNorm transformer blocks shared by the priors and the decoder's text encoder.

Attention goes through `F.scaled_dot_product_attention`, so flash / memory-efficient kernels are used
whenever the device offers them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OPENCLIP_VOCAB_SIZE = 49408


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
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

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), attn_mask)
        return x + self.mlp(self.ln_mlp(x))


class Transformer(nn.Module):
    """A stack of blocks; `attn_mask` is a boolean [L, L] or [B, 1, L, L] mask (True = may attend)."""

    def __init__(
        self, width: int, layers: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, mlp_ratio, dropout) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, attn_mask)
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
        context_length: int = 77,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        vocab_size: int = OPENCLIP_VOCAB_SIZE,
        dropout: float = 0.0,
    ) -> None:
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
