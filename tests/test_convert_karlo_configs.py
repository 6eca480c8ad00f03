"""conf/model/*_karlo.yaml build networks of Karlo's released shapes: built on the meta device (no
memory, no download) and linked tensor by tensor, shape by shape, to diffusers' models at the
configs of Karlo's conversion script (kakaobrain/karlo-v1-alpha)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from unclip.convert.folders import model_config  # noqa: E402
from unclip.convert.from_diffusers import PRIOR_STATISTICS  # noqa: E402
from unclip.convert.links import to_ours  # noqa: E402
from unclip.convert.networks import (  # noqa: E402
    decoder_extra_keys,
    decoder_links,
    prior_extra_keys,
    prior_links,
    unet_links,
)

KARLO_DECODER = {
    "sample_size": 64,
    "layers_per_block": 3,
    "down_block_types": ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
    "up_block_types": ["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "block_out_channels": (320, 640, 960, 1280),
    "in_channels": 3,
    "out_channels": 6,
    "cross_attention_dim": 1536,
    "class_embed_type": "identity",
    "attention_head_dim": 64,
    "resnet_time_scale_shift": "scale_shift",
}
KARLO_SUPER_RES = {
    "sample_size": 256,
    "layers_per_block": 3,
    "down_block_types": ["ResnetDownsampleBlock2D"] * 4,
    "up_block_types": ["ResnetUpsampleBlock2D"] * 4,
    "block_out_channels": (320, 640, 960, 1280),
    "in_channels": 6,
    "out_channels": 3,
    "add_attention": False,
}


def own_text(cfg: dict, key: str) -> None:
    """The frozen ViT-L/14 text tower (12 layers of 768, 77 tokens) as an own encoder of the same
    shapes: building the CLIP itself would download it. Its tensors are not part of the link."""
    cfg[key] = {"mode": "own", "width": 768, "context_length": 77, "layers": 12, "heads": 12}


def count(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def linked(links, ours: dict, theirs: dict, extra: list[str]) -> dict:
    ours = {k: v for k, v in ours.items() if k not in extra}
    return to_ours(links, theirs, ours)  # raises naming any tensor that does not fit


def test_prior_karlo_config_has_karlo_shapes() -> None:
    from unclip.models.diffusion_prior import DiffusionPriorModule

    cfg = model_config("prior_diffusion_karlo")
    own_text(cfg, "text_encoder")
    cfg["null_condition"] = "learned"  # the empty-caption null needs the real CLIP
    with torch.device("meta"):
        net = DiffusionPriorModule(**{**cfg, "ema": None}).net
        theirs = diffusers.PriorTransformer().state_dict()  # Karlo's prior: the defaults
    theirs = {k: v for k, v in theirs.items() if k not in PRIOR_STATISTICS}
    mapped = linked(prior_links(net), net.state_dict(), theirs, prior_extra_keys(net))
    print(
        f"prior_diffusion_karlo: {count(mapped) / 1e6:.1f}M parameters (Karlo: {count(theirs) / 1e6:.1f}M)"
    )
    assert count(mapped) == count(theirs)
    assert net.width == 2048 and len(net.transformer.blocks) == 20 and net.context_length == 77


def test_decoder_karlo_config_has_karlo_shapes() -> None:
    from unclip.convert.to_diffusers import text_proj_class
    from unclip.models.decoder import DecoderModule

    cfg = model_config("decoder_karlo")
    own_text(cfg["net"], "text")
    with torch.device("meta"):
        net = DecoderModule(**{**cfg, "ema": None}).net
        unet = diffusers.UNet2DConditionModel(**KARLO_DECODER).state_dict()
        proj = text_proj_class()(time_embed_dim=1280, cross_attention_dim=1536).state_dict()
    theirs = {f"decoder.{k}": v for k, v in unet.items()}
    theirs.update({f"text_proj.{k}": v for k, v in proj.items()})
    mapped = linked(decoder_links(net), net.state_dict(), theirs, decoder_extra_keys(net))
    # unclip folds diffusers' two conditioning biases into one
    print(
        f"decoder_karlo: {count(mapped) / 1e6:.1f}M parameters (Karlo: {count(theirs) / 1e6:.1f}M)"
    )
    assert count(mapped) == count(theirs) - 1280


def test_upsampler_karlo_config_has_karlo_shapes() -> None:
    from unclip.models.upsampler import UpsamplerModule

    cfg = model_config("upsampler_256_karlo")
    with torch.device("meta"):
        net = UpsamplerModule(**{**cfg, "ema": None}).net
        theirs = diffusers.UNet2DModel(**KARLO_SUPER_RES).state_dict()
    mapped = linked(unet_links(net), net.state_dict(), theirs, [])
    print(
        f"upsampler_256_karlo: {count(mapped) / 1e6:.1f}M parameters (Karlo: {count(theirs) / 1e6:.1f}M)"
    )
    assert count(mapped) == count(theirs)
