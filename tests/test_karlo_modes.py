"""The Karlo options of the networks, each against what it stands for: the projected pooled text
is CLIP's text embedding, the empty-caption null is the CLIP encoding of "" (in training drops and
in guidance), raw z_t reaches the prior unchanged, the x0 clamp bounds the prior's predictions."""

from __future__ import annotations

import torch

from unclip.clip import load_clip
from unclip.models.captions import build_caption_encoder
from unclip.models.diffusion_prior import DiffusionPriorModule
from unclip.nn.decoder_net import DecoderNet, DecoderNetConfig
from unclip.nn.unet import UNetConfig

CAPTIONS = ["a red circle", "a blue star on a green square"]


def test_projected_pooled_text_is_clips_text_embedding() -> None:
    torch.manual_seed(0)
    text = {"mode": "clip", "clip": "unclip-tiny", "pooled": "projected"}
    encoder = build_caption_encoder(text, "model.net.text")
    tokens = encoder.tokenize(CAPTIONS)
    _, pooled, _ = encoder(encoder.trim(tokens))
    with torch.no_grad():
        want = encoder.clip_model.encode_text(tokens)
    assert encoder.pooled_dim == want.shape[1] != encoder.out_dim
    assert (pooled - want).abs().max() < 1e-5
    assert (encoder.clip_text_embedding(tokens) - want).abs().max() < 1e-5
    config = DecoderNetConfig(
        unet=UNetConfig(model_channels=16, channel_mult=(1,), attention_resolutions=()),
        text_proj_norm=True,
    )
    decoder = DecoderNet(want.shape[1], config, caption_encoder=encoder, image_size=8)
    assert decoder.unet.cond_proj.in_features == 2 * want.shape[1]
    assert isinstance(decoder.text_norm, torch.nn.LayerNorm)


def karlo_prior(**overrides) -> DiffusionPriorModule:
    clip = load_clip("unclip-tiny")  # only for embed_dim
    kwargs = {
        "embed_dim": clip.info["embed_dim"],
        "net": {"width": 32, "layers": 1, "heads": 2},
        "text_encoder": {"mode": "clip", "clip": "unclip-tiny"},
        "text_embedding": "raw",
        "null_condition": "empty_caption",
        "text_drop_prob": 0.5,
        "sampling": {"steps": 3, "best_of": 1, "guidance_scale": 3.0, "clip_x0": 0.5},
        "unit_norm_output": False,
        "ema": None,
    }
    return DiffusionPriorModule(**{**kwargs, **overrides}).eval()


def test_empty_caption_null_in_training_drops_and_guidance() -> None:
    torch.manual_seed(0)
    prior = karlo_prior()
    encoder = prior.net.caption_encoder
    empty = encoder.clip_text_embedding(encoder.tokenize([""]))
    txt = torch.randn(4, prior.embed_dim) * 3
    assert torch.equal(prior.text_condition(txt), txt)  # raw: no rescale to radius sqrt(d)
    drop = torch.tensor([True, False, True, False])
    captions, swapped = prior.with_empty_captions(["a", "b", "c", "d"], txt, drop)
    assert captions == ["", "b", "", "d"]
    assert torch.equal(swapped[1], txt[1]) and torch.allclose(swapped[0], empty[0])
    # guidance's unconditional half is the prefix of the empty caption with its embedding
    null = prior.unconditional_prefix(prior.net, 2)
    want = prior.net.condition(prior.tokenize(["", ""]), empty.expand(2, -1))
    assert torch.equal(null.states, want.states) and torch.equal(null.mask, want.mask)


def test_x0_clamp_bounds_the_prior_predictions() -> None:
    torch.manual_seed(0)
    prior = karlo_prior()
    with torch.no_grad():
        for p in prior.net.out.parameters():
            p.mul_(0).add_(50.0)  # predictions far outside +-clip_x0
    txt = torch.randn(2, prior.embed_dim)
    z = prior.sample(CAPTIONS, txt)
    # the final x0 is clamped to +-0.5 in the standardised space (mean 0, std 1 here)
    assert z.abs().max() <= 0.5 + 1e-5
    free = karlo_prior(sampling={"steps": 3, "best_of": 1, "clip_x0": None})
    free.net.load_state_dict(prior.net.state_dict())
    assert free.sample(CAPTIONS, txt).abs().max() > 10
