"""Captions -> per-token states, a pooled summary and the mask of real tokens.

Two sources, a config choice of every stage that reads captions:
  - "own":  a small causal `TextTransformer` over open_clip BPE tokens, trained with the stage
            (what the paper's priors and GLIDE-style decoder do);
  - "clip": the frozen token states of a CLIP text tower (what Karlo's decoder does). The stage
            loads the CLIP from the spec in `clip` and hands it in; it is never trained and kept
            out of the stage's state_dict (the checkpoint stores the spec, not the weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from unclip.nn.transformer import TextTransformer

MODES = ("own", "clip")
# the pooled summary: the EOT token's state, or (clip mode) that state through CLIP's text projection,
# i.e. the CLIP text embedding itself (what diffusers' UnCLIP decoder adds to its timestep embedding)
POOLED = ("eot", "projected")
PAD_ID = 0  # open_clip pads with 0 after the EOT token
EOT_TOKEN_ID = 49407


@dataclass
class CaptionEncoderConfig:
    """`model.text_encoder` (priors) / `model.net.text` (decoder). In "clip" mode width,
    context_length, layers and heads come from the CLIP's text tower and `clip` is a spec for
    `unclip.clip.load_clip`. pooled: the summary, "eot" or (clip mode) "projected", the raw CLIP
    text embedding (Karlo's decoder)."""

    mode: str = "own"
    width: int = 256
    context_length: int = 77
    layers: int = 2
    heads: int = 4
    clip: str | None = None
    dropout: float = 0.0
    pooled: str = "eot"


def token_states(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token text states of an open_clip CLIP after `ln_final` (what Karlo's decoder attends
    to) and the mask of tokens up to and including EOT. `encode_text` returns only the pooled
    vector."""
    if not hasattr(model, "token_embedding"):
        raise NotImplementedError(
            f"token states need open_clip's built-in text tower; {type(model).__name__} has a custom one"
        )
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding.to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    eot_position = (tokens == EOT_TOKEN_ID).int().argmax(dim=-1, keepdim=True)
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    return x, positions <= eot_position


class FrozenHandle:
    """Holds a module outside its owner's parameters and state_dict. A deepcopy (the EMA copy of a
    network) shares the module instead of duplicating a frozen CLIP."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict) -> FrozenHandle:
        return self


class CaptionEncoder(nn.Module):
    """`tokenize(captions)` then `forward(tokens) -> (states [B,L,out_dim], pooled [B,pooled_dim],
    pad_mask [B,L] True = real token)`.

    "clip" mode needs `clip_model` (an open_clip CLIP, frozen here) and its `tokenizer`.
    """

    def __init__(
        self,
        config: CaptionEncoderConfig | None = None,
        /,
        *,
        clip_model: nn.Module | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        config = config if config is not None else CaptionEncoderConfig(**settings)
        if config.mode not in MODES:
            raise ValueError(f"caption encoder mode must be one of {MODES}, got {config.mode!r}")
        if config.pooled not in POOLED:
            raise ValueError(
                f"caption encoder pooled must be one of {POOLED}, got {config.pooled!r}"
            )
        if config.pooled == "projected" and config.mode != "clip":
            raise ValueError(
                "caption encoder pooled='projected' needs mode 'clip' (a CLIP projection)"
            )
        self.config = config
        self.pooled = config.pooled
        self.mode = config.mode
        self.text: TextTransformer | None = None
        self._clip: FrozenHandle | None = None
        if config.mode == "own":
            self.text = TextTransformer(
                config.context_length,
                config.width,
                config.layers,
                config.heads,
                dropout=config.dropout,
            )
            self.context_length = config.context_length
            self.out_dim = config.width
            self.pooled_dim = config.width
            self._tokenizer: Any = open_clip.SimpleTokenizer(context_length=config.context_length)
            return
        if clip_model is None or tokenizer is None:
            raise ValueError(
                "caption encoder mode 'clip' needs the CLIP named in `clip` (the stage loads it)"
            )
        model = clip_model.eval().requires_grad_(False)
        if not hasattr(model, "token_embedding"):
            raise ValueError(
                f"CLIP {config.clip!r} has no open_clip text tower to read tokens from"
            )
        self._clip = FrozenHandle(model)
        self.context_length = int(model.context_length)
        self.out_dim = int(model.transformer.width)
        self._tokenizer = tokenizer
        self.pooled_dim = self.out_dim
        if config.pooled == "projected":
            self.pooled_dim = int(self._projection(torch.zeros(1, self.out_dim)).shape[-1])

    @property
    def clip_model(self) -> nn.Module | None:
        return self._clip.module if self._clip is not None else None

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """open_clip BPE ids [B, context_length] (SOT ... EOT, zero padded, truncated to fit)."""
        return self._tokenizer(list(captions))

    @staticmethod
    def trim(tokens: torch.Tensor) -> torch.Tensor:
        """Drop the padding columns after the batch's longest caption. Both encoders are causal, so
        the states of real tokens do not change, and the sequences a consumer attends over shrink
        (shapes captions fill ~12 of 77 positions)."""
        longest = int((tokens != PAD_ID).sum(dim=-1).max()) if tokens.numel() else 0
        return tokens[:, : max(1, longest)]

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens [B, L] with L <= context_length (full or `trim`med) -> states of the same L."""
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"{length} tokens per caption exceed context_length {self.context_length}"
            )
        if self.text is not None:
            return self.text(tokens)
        full = F.pad(tokens, (0, self.context_length - length), value=PAD_ID)
        with torch.no_grad():
            states, pad_mask = token_states(self.clip_model, full)
        states, pad_mask = states[:, :length].float(), pad_mask[:, :length]
        eot_index = pad_mask.long().sum(dim=-1) - 1
        pooled = states[torch.arange(states.shape[0], device=states.device), eot_index]
        if self.pooled == "projected":
            pooled = self._projection(pooled)
        return states, pooled, pad_mask

    def _projection(self, pooled: torch.Tensor) -> torch.Tensor:
        """CLIP's text projection (a matrix or a Linear, depending on the open_clip model)."""
        projection = self.clip_model.text_projection
        if isinstance(projection, nn.Module):
            return projection(pooled)
        return pooled @ projection.to(pooled.dtype)

    @torch.no_grad()
    def clip_text_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, embed] raw (un-normalised) CLIP text embeddings of full-length tokens (clip mode)."""
        if self.clip_model is None:
            raise ValueError("CLIP text embeddings need caption encoder mode 'clip'")
        _, pooled, _ = self.forward(tokens)
        return pooled if self.pooled == "projected" else self._projection(pooled)

    # the frozen CLIP follows the encoder across devices and dtypes without being registered
    def _apply(self, fn: Any, recurse: bool = True) -> CaptionEncoder:
        super()._apply(fn, recurse)
        if self._clip is not None:
            self._clip.module._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> CaptionEncoder:
        super().train(mode)
        if self._clip is not None:
            self._clip.module.eval()
        return self
