"""diffusers -> unclip: tiny diffusers models with every parameter randomised, saved with
`save_pretrained`, converted, and run on the same inputs (max |delta| <= 1e-5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

from unclip.convert.from_diffusers import convert  # noqa: E402
from unclip.training.module import load_module  # noqa: E402

TOL = 1e-5
EMBED = 16
TOKENS = 7


def randomise(model: torch.nn.Module, seed: int, scale: float = 0.15) -> torch.nn.Module:
    """Every parameter random (zero-initialised output layers would hide mapping errors); norm
    weights stay near 1 and std-like parameters positive so activations keep a sane scale."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + noise)
            elif name.endswith("clip_std"):
                param.copy_(0.5 + noise.abs())
            else:
                param.copy_(noise)
    return model.eval()


def caption_mask(batch: int, length: int) -> torch.Tensor:
    lengths = torch.tensor([length, 2, 4][:batch])
    return torch.arange(length)[None] < lengths[:, None]


def tiny_prior() -> torch.nn.Module:
    return diffusers.PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        embedding_dim=EMBED,
        num_embeddings=TOKENS,
    )


def tiny_decoder() -> tuple[torch.nn.Module, torch.nn.Module]:
    from unclip.convert.to_diffusers import text_proj_class

    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=6,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=24,
        attention_head_dim=32,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    )
    text_proj = text_proj_class()(
        clip_extra_context_tokens=4,
        clip_embeddings_dim=EMBED,
        time_embed_dim=128,
        cross_attention_dim=24,
    )
    return unet, text_proj


def tiny_upsampler() -> torch.nn.Module:
    return diffusers.UNet2DModel(
        sample_size=16,
        in_channels=6,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
        up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        add_attention=False,
        resnet_time_scale_shift="default",
    )


def test_prior_matches_prior_transformer_full_and_cached(tmp_path: Path) -> None:
    theirs = randomise(tiny_prior(), seed=0)
    theirs.save_pretrained(tmp_path / "prior")
    ckpt = convert(tmp_path / "prior", "prior", tmp_path / "prior.ckpt")
    module = load_module(ckpt)
    net = module.eval_net

    g = torch.Generator().manual_seed(1)
    batch = 3
    x_t = torch.randn(batch, EMBED, generator=g)
    t = torch.tensor([0, 417, 999])
    txt = torch.randn(batch, EMBED, generator=g) * 2
    states = torch.randn(batch, TOKENS, EMBED, generator=g)
    mask = caption_mask(batch, TOKENS)
    with torch.no_grad():
        want = theirs(
            x_t, t, proj_embedding=txt, encoder_hidden_states=states, attention_mask=mask
        ).predicted_image_embedding
        prefix = net.condition_on_states(states, mask, module.text_condition(txt))
        full = net.denoise(x_t, t, prefix)
        cached = net.cache(prefix).denoise(x_t, t)
    full_delta = (full - want).abs().max().item()
    cached_delta = (cached - want).abs().max().item()
    print(f"prior max |delta|: full {full_delta:.2e}, cached {cached_delta:.2e}")
    assert want.abs().max() > 0.1  # a real output, not a zero one
    assert full_delta <= TOL and cached_delta <= TOL
    # the statistics come over too: denormalising is diffusers' post_process_latents
    z = torch.randn(batch, EMBED, generator=g)
    post = theirs.post_process_latents(z)
    assert (module.embedding_norm.denormalize(z) - post).abs().max() <= TOL
    assert module.text_embedding == "raw" and not module.embedding_norm.needs_fit


def diffusers_decoder(unet, text_proj, x_t, t, img, prompt, states, mask) -> torch.Tensor:
    """What UnCLIPPipeline computes per decoder step (without its guidance batching)."""
    hidden, additive = text_proj(
        image_embeddings=img,
        prompt_embeds=prompt,
        text_encoder_hidden_states=states,
        do_classifier_free_guidance=False,
    )
    return unet(
        x_t,
        t,
        encoder_hidden_states=hidden,
        class_labels=additive,
        attention_mask=F.pad(mask, (text_proj.clip_extra_context_tokens, 0), value=True),
    ).sample


def test_decoder_matches_unet2dcondition_with_text_proj(tmp_path: Path) -> None:
    unet, text_proj = tiny_decoder()
    randomise(unet, seed=2, scale=0.1).save_pretrained(tmp_path / "decoder")
    randomise(text_proj, seed=3, scale=0.1).save_pretrained(tmp_path / "text_proj")
    ckpt = convert(
        tmp_path / "decoder", "decoder", tmp_path / "dec.ckpt", text_proj=tmp_path / "text_proj"
    )
    net = load_module(ckpt).eval_net.to(memory_format=torch.contiguous_format)

    g = torch.Generator().manual_seed(4)
    batch = 3
    x_t = torch.randn(batch, 3, 8, 8, generator=g)
    t = torch.tensor([3, 500, 998])
    img = torch.randn(batch, EMBED, generator=g)
    prompt = torch.randn(batch, EMBED, generator=g)
    states = torch.randn(batch, TOKENS, EMBED, generator=g)
    mask = caption_mask(batch, TOKENS)
    with torch.no_grad():
        want = diffusers_decoder(unet, text_proj, x_t, t, img, prompt, states, mask)
        ours = net.denoise(x_t, t, net.condition_on_states(img, states, prompt, mask))
        # a dropped image embedding is diffusers' learned classifier-free guidance embedding
        null = text_proj.learned_classifier_free_guidance_embeddings.expand(batch, -1)
        want_null = diffusers_decoder(unet, text_proj, x_t, t, null, prompt, states, mask)
        dropped = net.condition_on_states(img, states, prompt, mask, torch.ones(batch).bool())
        ours_null = net.denoise(x_t, t, dropped)
    delta = (ours - want).abs().max().item()
    null_delta = (ours_null - want_null).abs().max().item()
    print(
        f"decoder max |delta|: {delta:.2e} (null image embedding: {null_delta:.2e}; outputs up to {want.abs().max():.1f})"
    )
    assert want.abs().max() > 0.1
    assert delta <= TOL and null_delta <= TOL


def test_upsampler_matches_unet2dmodel_and_lifts_like_the_pipeline(tmp_path: Path) -> None:
    theirs = randomise(tiny_upsampler(), seed=5)
    theirs.save_pretrained(tmp_path / "sr", safe_serialization=False)  # a torch .bin this time
    assert (tmp_path / "sr" / "diffusion_pytorch_model.bin").is_file()
    module = load_module(convert(tmp_path / "sr", "upsampler", tmp_path / "sr.ckpt"))
    module.to(memory_format=torch.contiguous_format)  # NCHW sums like diffusers' to 1e-5
    assert (module.low_res_size, module.image_size) == (4, 16)

    g = torch.Generator().manual_seed(6)
    low = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    x_t = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([10, 900])
    lifted = module.lift(low)
    # diffusers' UnCLIPPipeline: anti-aliased bicubic when enlarging the decoder's image
    pipeline_lift = F.interpolate(low, size=16, mode="bicubic", align_corners=False, antialias=True)
    assert (lifted - pipeline_lift).abs().max() <= TOL
    with torch.no_grad():
        want = theirs(torch.cat([x_t, pipeline_lift], 1), t).sample
        ours = module.eval_net(torch.cat([x_t, pipeline_lift], 1), t)
    delta = (ours - want).abs().max().item()
    print(f"upsampler max |delta|: {delta:.2e}")
    assert want.abs().max() > 0.1
    assert delta <= TOL


def test_cli_errors_are_one_line_naming_what_is_wrong(tmp_path: Path) -> None:
    from unclip.convert.__main__ import main

    with pytest.raises(SystemExit, match="nowhere: not a diffusers folder"):
        main(["from-diffusers", str(tmp_path / "nowhere"), "--stage", "prior", "--out", "x.ckpt"])
    attention_prior = tiny_prior()
    attention_prior.register_to_config(norm_in_type="layer")
    attention_prior.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match="norm_in_type='layer' is not supported"):
        main(["from-diffusers", str(tmp_path / "other"), "--stage", "prior", "--out", "x.ckpt"])
    unet, _ = tiny_decoder()
    unet.save_pretrained(tmp_path / "decoder")
    with pytest.raises(SystemExit, match="needs --text-proj"):
        main(["from-diffusers", str(tmp_path / "decoder"), "--stage", "decoder", "--out", "x.ckpt"])
