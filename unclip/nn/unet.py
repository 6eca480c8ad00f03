"""The ADM / GLIDE UNet (Dhariwal & Nichol 2021, Nichol et al. 2021) that the decoder and the
upsamplers denoise with.

Residual blocks read the timestep embedding (plus an optional conditioning vector) through
scale-shift normalisation; self-attention runs at configured feature-map sizes and, when the network
is given context tokens, every attention layer attends to them together with its own keys and values
(GLIDE's text conditioning, which unCLIP also feeds with its four CLIP-embedding tokens).
Layout and initialisation follow guided-diffusion's unet.py: output convolutions start at zero, so
a fresh block is the identity and a fresh network predicts zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unclip.nn.transformer import timestep_embedding

MAX_NORM_GROUPS = 32

__all__ = ["UNet", "UNetConfig", "timestep_embedding"]


@dataclass
class UNetConfig:
    """`model.net.unet` (decoder) / `model.unet` (upsamplers): the UNet's own hyperparameters.
    Channels in and out, the input size and the conditioning sizes follow from the stage."""

    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    # feature-map sizes in pixels with self-attention (+ attention to context tokens)
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_head_channels: int = 32
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    # two extra input channels holding each pixel's x and y in [-1, 1] (CoordConv, Liu et al.
    # 2018; not in GLIDE): convolutions and attention otherwise see position only through the
    # zero padding, and "left of" / "above" need it
    coordinate_channels: bool = False
    # each attention block adds a 2D sinusoidal code of the pixel's position to its normalised
    # input, through a learned projection that starts at zero (absolute position embeddings as in
    # ViT, sized to any feature map; not in GLIDE): queries then know where they are, so a
    # caption token can be drawn to one half of the image
    attention_position: bool = False
    # feature-map sizes (not in attention_resolutions) where each residual block is followed by
    # attention to the context tokens alone, without self-attention: linear in the pixels, so every
    # pixel of a fine map can read the caption (Stable Diffusion's cross-attention everywhere; GLIDE
    # reads its tokens only where it self-attends)
    context_resolutions: tuple[int, ...] = ()


def zero_module(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


def normalization(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (fewer for the narrow layers of tiny configs)."""
    return nn.GroupNorm(math.gcd(MAX_NORM_GROUPS, channels), channels)


class Downsample(nn.Module):
    def __init__(self, channels: int, out_channels: int | None = None, use_conv: bool = True):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels == channels:
            self.op = nn.AvgPool2d(2)
        else:
            raise ValueError("Downsample without a convolution cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, out_channels: int | None = None, use_conv: bool = True):
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Upsample without a convolution cannot change the channel count")
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = upsample_nearest_2x(x)
        return self.conv(x) if self.conv is not None else x


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """`F.interpolate(x, scale_factor=2, mode="nearest")` as a broadcast copy: the same tensor,
    in the memory format it came in, about 3x faster on CPU than the interpolate kernel."""
    b, c, h, w = x.shape
    wide = x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and c > 1
    out = wide.reshape(b, c, 2 * h, 2 * w)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


class ResBlock(nn.Module):
    """A residual block that reads the embedding `emb` [B, emb_dim]; with `use_scale_shift_norm`
    the embedding sets a per-channel scale and shift after the second normalisation (ADM's
    AdaGN), otherwise it is added. `up`/`down` resample inside the block (BigGAN style)."""

    def __init__(
        self,
        channels: int,
        emb_dim: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("a ResBlock resamples up or down, not both")
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = normalization(channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        # parameter-free (nearest / average pooling), so one module serves both paths
        if up:
            self.resample: nn.Module = Upsample(channels, use_conv=False)
        elif down:
            self.resample = Downsample(channels, use_conv=False)
        else:
            self.resample = nn.Identity()
        self.emb_proj = nn.Linear(
            emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels
        )
        self.out_norm = normalization(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        if out_channels == channels:
            self.skip = nn.Identity()
        else:
            self.skip = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self.resample(h))
        x = self.resample(x)
        emb = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


POSITION_FREQUENCIES = 8  # per axis: sin and cos of each, so 4 * 8 position features


def position_code(height: int, width: int, device: Any = None, dtype: Any = None) -> torch.Tensor:
    """[4 * POSITION_FREQUENCIES, height * width]: sin/cos features of each pixel's row and
    column centre, scaled to [0, 1] across the map so one code serves every feature-map size."""
    freqs = math.pi * 2.0 ** torch.arange(POSITION_FREQUENCIES, device=device, dtype=torch.float32)
    features = []
    for length in (height, width):
        centres = (torch.arange(length, device=device, dtype=torch.float32) + 0.5) / length
        angles = centres[:, None] * freqs[None, :]
        features.append(torch.cat([angles.sin(), angles.cos()], dim=1))  # [length, 2F]
    rows, cols = features
    grid = torch.cat(
        [
            rows[:, None, :].expand(height, width, -1),
            cols[None, :, :].expand(height, width, -1),
        ],
        dim=2,
    )
    return grid.reshape(height * width, -1).t().to(dtype)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map. Given `context` tokens
    [B, N, context_dim], each head also attends to their projected keys and values (GLIDE);
    `context_mask` [B, N] (True = real token) hides padding. With `position`, a projected
    `position_code` is added to the normalised input before the projections to q, k and v."""

    def __init__(
        self,
        channels: int,
        num_head_channels: int,
        context_dim: int | None = None,
        position: bool = False,
        self_attention: bool = True,
    ) -> None:
        super().__init__()
        if not self_attention and not context_dim:
            raise ValueError("an attention block without self-attention needs context tokens")
        if channels < num_head_channels:
            num_head_channels = channels  # one head on maps narrower than a head
        if channels % num_head_channels:
            raise ValueError(
                f"attention at {channels} channels: not divisible by num_head_channels "
                f"{num_head_channels}"
            )
        self.heads = channels // num_head_channels
        self.norm = normalization(channels)
        self.self_attention = self_attention
        self.qkv = nn.Conv1d(channels, (3 if self_attention else 1) * channels, 1)
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim else None
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))
        self.position_proj = (
            zero_module(nn.Conv1d(4 * POSITION_FREQUENCIES, channels, 1)) if position else None
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, C] -> [B, heads, L, C // heads] (a view)."""
        batch, length, channels = x.shape
        return x.view(batch, length, self.heads, channels // self.heads).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        # the pixels as tokens [B, L, C]; a view of a channels_last map, so the 1x1 projections
        # run as matrix products on it without the [B, C, L] copies
        h = self.norm(x).flatten(2).transpose(1, 2)
        if self.position_proj is not None:
            code = position_code(*spatial, device=x.device, dtype=h.dtype).t()
            h = h + _pointwise(self.position_proj, code)
        projected = _pointwise(self.qkv, h)
        if self.self_attention:
            q, k, v = (self._heads(part) for part in projected.chunk(3, dim=-1))
        else:
            if context is None or self.context_kv is None:
                raise ValueError("this attention block reads context tokens only: pass context")
            q, k, v = self._heads(projected), None, None
        mask = None
        if context is not None and self.context_kv is not None:
            context_k, context_v = (self._heads(p) for p in self.context_kv(context).chunk(2, -1))
            k = context_k if k is None else torch.cat([context_k, k], dim=2)
            v = context_v if v is None else torch.cat([context_v, v], dim=2)
            if context_mask is not None:
                own = context_mask.new_ones(batch, k.shape[2] - context.shape[1])
                keys = torch.cat([context_mask.bool(), own], dim=1)
                # an additive mask: CPU's fused attention kernel takes it, a boolean one falls
                # back to the unfused math path
                mask = torch.zeros(keys.shape, dtype=q.dtype, device=q.device)
                mask = mask.masked_fill(~keys, float("-inf"))[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = _pointwise(self.proj_out, out.transpose(1, 2).reshape(batch, -1, channels))
        return x + out.transpose(1, 2).reshape(batch, channels, *spatial)


def _pointwise(conv: nn.Conv1d, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 `Conv1d` applied to tokens [..., L, C_in] -> [..., L, C_out]: the same weights (and
    checkpoints) as on [B, C, L], as one matrix product."""
    return F.linear(tokens, conv.weight.squeeze(-1), conv.bias)


# where torch's wrappers keep the module they wrap: FSDP units, activation checkpointing
WRAPPED_MODULE_ATTRS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "module")


def unwrapped(layer: nn.Module) -> nn.Module:
    """The block inside FSDP / activation-checkpoint wrappers, so dispatch by type survives them."""
    for _ in range(4):
        inner = next(
            (
                getattr(layer, a)
                for a in WRAPPED_MODULE_ATTRS
                if isinstance(getattr(layer, a, None), nn.Module)
            ),
            None,
        )
        if inner is None or isinstance(layer, (ResBlock, AttentionBlock)):
            return layer
        layer = inner
    return layer


class EmbedSequential(nn.Sequential):
    """A sequence of layers, each given the inputs it takes: ResBlocks the embedding, attention
    blocks the context, everything else the feature map alone."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for layer in self:
            block = unwrapped(layer)
            if isinstance(block, ResBlock):
                x = layer(x, emb)
            elif isinstance(block, AttentionBlock):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


def with_coordinates(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] with two channels more: each pixel's x and y, from -1 to 1 across the input."""
    batch, _, height, width = x.shape
    ys = torch.linspace(-1.0, 1.0, height, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=0)
    return torch.cat([x, grid.expand(batch, -1, -1, -1)], dim=1)


class UNet(nn.Module):
    """The ADM UNet. `attention_resolutions` are feature-map sizes in pixels (for inputs of
    `image_size`) at which self-attention follows each residual block; the middle block attends
    too whenever any level does. With no attention the network is fully convolutional and takes
    any input whose side is divisible by 2 ** (len(channel_mult) - 1) (the upsamplers' random crops).

    `cond_dim`: a vector [B, cond_dim] projected and added to the timestep embedding.
    `context_dim`: tokens [B, N, context_dim] every attention layer attends to (GLIDE).
    """

    def __init__(
        self,
        config: UNetConfig | None = None,
        /,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        image_size: int = 64,
        cond_dim: int | None = None,
        context_dim: int | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        config = config if config is not None else UNetConfig(**settings)
        self.config = config
        model_channels, channel_mult = config.model_channels, tuple(config.channel_mult)
        num_res_blocks, num_head_channels = config.num_res_blocks, config.num_head_channels
        attention_resolutions = tuple(config.attention_resolutions)
        dropout, use_scale_shift_norm = config.dropout, config.use_scale_shift_norm
        resblock_updown = config.resblock_updown
        levels = len(channel_mult)
        if image_size % 2 ** (levels - 1):
            raise ValueError(
                f"image_size {image_size} is not divisible by 2**{levels - 1} "
                f"(channel_mult has {levels} levels)"
            )
        sizes = {image_size // 2**level for level in range(levels)}
        for key in ("attention_resolutions", "context_resolutions"):
            unused = sorted(set(getattr(config, key)) - sizes)
            if unused:
                raise ValueError(
                    f"{key} {unused} match no feature-map size of a "
                    f"{image_size}px input (sizes: {sorted(sizes, reverse=True)})"
                )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.image_size = image_size
        self.num_levels = levels
        self.cond_dim = cond_dim
        self.context_dim = context_dim
        self.time_embed_dim = 4 * model_channels
        emb_dim = self.time_embed_dim
        self.model_channels = model_channels

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.cond_proj = nn.Linear(cond_dim, emb_dim) if cond_dim else None

        def res(ch: int, out: int, **resample: bool) -> ResBlock:
            return ResBlock(ch, emb_dim, dropout, out, use_scale_shift_norm, **resample)

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_head_channels, context_dim, config.attention_position)

        context_resolutions = tuple(config.context_resolutions)
        if context_resolutions and not context_dim:
            raise ValueError("context_resolutions need context tokens (a context_dim)")

        def attention_layers(ch: int, size: int) -> list[nn.Module]:
            if size in attention_resolutions:
                return [attention(ch)]
            if size in context_resolutions:
                position = config.attention_position
                return [AttentionBlock(ch, num_head_channels, context_dim, position, False)]
            return []

        ch = model_channels * channel_mult[0]
        self.coordinate_channels = config.coordinate_channels
        first_in = in_channels + (2 if self.coordinate_channels else 0)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(first_in, ch, 3, padding=1))])
        skip_channels = [ch]
        size = image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                layers += attention_layers(ch, size)
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch)
                self.input_blocks.append(EmbedSequential(down))
                skip_channels.append(ch)
                size //= 2

        middle: list[nn.Module] = [res(ch, ch)]
        if attention_resolutions:
            middle.append(attention(ch))
        middle.append(res(ch, ch))
        self.middle_block = EmbedSequential(*middle)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for block in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                layers += attention_layers(ch, size)
                if level and block == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch))
                    size *= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        factor = 2 ** (self.num_levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(
                f"input of size {tuple(x.shape[-2:])}: each side must be divisible by {factor}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError(f"this UNet needs cond [B, {self.cond_dim}] (cond_dim is set)")
            emb = emb + self.cond_proj(cond.to(emb.dtype))
        elif cond is not None:
            raise ValueError("cond given to a UNet built with cond_dim=None")
        if context is not None and self.context_dim is None:
            raise ValueError("context given to a UNet built with context_dim=None")
        skips = []
        h = with_coordinates(x) if self.coordinate_channels else x
        for block in self.input_blocks:
            h = block(h, emb, context, context_mask)
            skips.append(h)
        h = self.middle_block(h, emb, context, context_mask)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)
