"""A trained unclip stack -> a folder diffusers' `UnCLIPPipeline.from_pretrained` loads.

Writes prior, decoder + text_proj, super_res_first and super_res_last (the same upsampler), the three
UnCLIPSchedulers matching the stages' diffusion settings, and the text encoder and tokenizer made
from the CLIP the prior and decoder read captions with. The pipeline computes what unclip computes
only for stages built the Karlo way (the `*_karlo.yaml` settings); anything else is refused with the
config key to change, rather than exported to compute something else.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from unclip.convert.clip_text import text_encoder, tokenizer
from unclip.convert.from_diffusers import PRIOR_STATISTICS
from unclip.convert.links import to_theirs
from unclip.convert.networks import (
    decoder_extra_keys,
    decoder_links,
    prior_extra_keys,
    prior_links,
    unet_links,
)
from unclip.nn.unet import UNetConfig
from unclip.training.module import load_module

log = logging.getLogger(__name__)


def text_proj_class() -> type:
    """diffusers' UnCLIPTextProjModel (under pipelines/deprecated/ since the UnCLIP pipelines were
    deprecated, under pipelines/unclip/ before)."""
    try:
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    except ImportError:
        from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
    return UnCLIPTextProjModel


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"cannot export to diffusers' UnCLIPPipeline: {message}")


def _check_diffusion(module, where: str, prediction: str) -> None:
    diffusion = module.diffusion
    _require(
        diffusion.schedule == "cosine",
        f"{where}.diffusion.schedule must be cosine (UnCLIPScheduler)",
    )
    _require(
        diffusion.prediction == prediction, f"{where}.diffusion.prediction must be {prediction}"
    )


def _unet_blocks(cfg: UNetConfig, image_size: int, where: str) -> tuple[list[int], list[bool]]:
    """(block_out_channels, attention per level) of a built UNet's config, checked for diffusers."""
    mult = list(cfg.channel_mult)
    channels = [cfg.model_channels * m for m in mult]
    _require(
        all(c % 32 == 0 for c in channels),
        f"{where} channels {channels} must be multiples of 32 (diffusers' GroupNorm(32))",
    )
    _require(cfg.resblock_updown, f"{where}.resblock_updown must be true")
    for extra in ("coordinate_channels", "attention_position", "context_resolutions"):
        _require(not getattr(cfg, extra), f"{where}.{extra} has no diffusers counterpart")
    resolutions = set(cfg.attention_resolutions)
    attention = [image_size // 2**level in resolutions for level in range(len(mult))]
    return channels, attention


# ---- the three networks ------------------------------------------------------------------------
def prior_model(module) -> Any:
    from diffusers import PriorTransformer

    net = module.eval_net  # the weights unclip samples with (EMA when there is one)
    _require(
        net.caption_encoder.clip_model is not None, "the prior needs model.text_encoder.mode=clip"
    )
    _require(module.text_embedding == "raw", "the prior needs model.text_embedding=raw")
    _require(
        module.null_condition == "empty_caption",
        "the prior needs model.null_condition=empty_caption",
    )
    _check_diffusion(module, "the prior's model", "x0")
    block = net.transformer.blocks[0]
    _require(
        block.mlp.net[0].out_features == 4 * net.width, "the prior needs model.net.mlp_ratio=4"
    )
    _require(
        net.caption_encoder.out_dim == module.embed_dim,
        "the prior's CLIP text width must equal embed_dim (PriorTransformer)",
    )
    if module.unit_norm_output:
        log.warning(
            "the prior has unit_norm_output=true; diffusers' pipeline uses its output unnormalised"
        )
    theirs = PriorTransformer(
        num_attention_heads=block.attn.heads,
        attention_head_dim=net.width // block.attn.heads,
        num_layers=len(net.transformer.blocks),
        embedding_dim=module.embed_dim,
        num_embeddings=net.context_length,
        additional_embeddings=4,
    )
    ours = {k: v for k, v in net.state_dict().items() if k not in prior_extra_keys(net)}
    like = {k: v for k, v in theirs.state_dict().items() if k not in PRIOR_STATISTICS}
    state = to_theirs(prior_links(net), ours, like)
    norm = module.embedding_norm
    if norm.kind == "standardize":
        state["clip_mean"], state["clip_std"] = norm.mean[None].float(), norm.std[None].float()
    else:  # l2: the prior's space is z * sqrt(d) / |z|, which post_process_latents undoes as x / sqrt(d)
        state["clip_mean"] = torch.zeros(1, module.embed_dim)
        state["clip_std"] = torch.full((1, module.embed_dim), module.embed_dim**-0.5)
    theirs.load_state_dict(state)
    return theirs.eval()


def decoder_models(module) -> tuple[Any, Any]:
    from diffusers import UNet2DConditionModel

    UnCLIPTextProjModel = text_proj_class()  # noqa: N806

    net = module.eval_net
    _require(
        net.text is not None and net.text.clip_model is not None,
        "the decoder needs model.net.text.mode=clip",
    )
    _require(net.text.pooled == "projected", "the decoder needs model.net.text.pooled=projected")
    _require(
        not net.rescale_image_embedding, "the decoder needs model.net.rescale_image_embedding=false"
    )
    _check_diffusion(module, "the decoder's model", "eps")
    _require(
        module.diffusion.learned_variance, "the decoder needs model.diffusion.learned_variance=true"
    )
    _require(
        net.text.out_dim == module.embed_dim == net.text.pooled_dim,
        "the decoder's CLIP text width and embedding size must equal embed_dim (UnCLIPTextProjModel)",
    )
    unet_cfg = net.config.unet
    channels, attention = _unet_blocks(unet_cfg, module.image_size, "the decoder's model.net.unet")
    _require(any(attention), "the decoder needs attention (diffusers' middle block always attends)")
    theirs_unet = UNet2DConditionModel(
        sample_size=module.image_size,
        in_channels=3,
        out_channels=6,
        layers_per_block=unet_cfg.num_res_blocks,
        block_out_channels=channels,
        down_block_types=[
            "SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attention
        ],
        up_block_types=[
            "SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D"
            for a in reversed(attention)
        ],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=net.context_dim,
        attention_head_dim=unet_cfg.num_head_channels,
        resnet_time_scale_shift="scale_shift" if unet_cfg.use_scale_shift_norm else "default",
        class_embed_type="identity",
        dropout=unet_cfg.dropout,
    )
    theirs_proj = UnCLIPTextProjModel(
        clip_extra_context_tokens=net.num_image_tokens,
        clip_embeddings_dim=module.embed_dim,
        time_embed_dim=net.unet.time_embed_dim,
        cross_attention_dim=net.context_dim,
    )
    like = {f"decoder.{k}": v for k, v in theirs_unet.state_dict().items()}
    like.update({f"text_proj.{k}": v for k, v in theirs_proj.state_dict().items()})
    ours = {k: v for k, v in net.state_dict().items() if k not in decoder_extra_keys(net)}
    state = to_theirs(decoder_links(net), ours, like)
    theirs_unet.load_state_dict(
        {k[len("decoder.") :]: v for k, v in state.items() if k.startswith("decoder.")}
    )
    theirs_proj.load_state_dict(
        {k[len("text_proj.") :]: v for k, v in state.items() if k.startswith("text_proj.")}
    )
    return theirs_unet.eval(), theirs_proj.eval()


def upsampler_model(module) -> Any:
    from diffusers import UNet2DModel

    _check_diffusion(module, "the upsampler's model", "eps")
    _require(not module.residual, "the upsampler needs model.residual=false")
    if not module.lift_antialias:
        log.warning(
            "the upsampler has lift_antialias=false; diffusers' pipeline lifts with antialias"
        )
    unet_cfg = module.eval_net.config
    channels, _ = _unet_blocks(unet_cfg, module.image_size, "the upsampler's model.unet")
    levels = len(channels)
    theirs = UNet2DModel(
        sample_size=module.image_size,
        in_channels=6,
        out_channels=6 if module.diffusion.learned_variance else 3,
        layers_per_block=unet_cfg.num_res_blocks,
        block_out_channels=channels,
        down_block_types=["ResnetDownsampleBlock2D"] * levels,
        up_block_types=["ResnetUpsampleBlock2D"] * levels,
        add_attention=False,
        resnet_time_scale_shift="scale_shift" if unet_cfg.use_scale_shift_norm else "default",
        dropout=unet_cfg.dropout,
    )
    theirs.load_state_dict(
        to_theirs(unet_links(module.eval_net), module.eval_net.state_dict(), theirs.state_dict())
    )
    return theirs.eval()


def schedulers(prior, decoder, upsampler) -> dict[str, Any]:
    from diffusers import UnCLIPScheduler

    clip_x0 = prior.sampling.get("clip_x0")
    return {
        "prior_scheduler": UnCLIPScheduler(
            num_train_timesteps=prior.diffusion.num_timesteps,
            variance_type="fixed_small_log",
            prediction_type="sample",
            clip_sample=clip_x0 is not None,
            clip_sample_range=float(clip_x0 or 1.0),
        ),
        "decoder_scheduler": UnCLIPScheduler(
            num_train_timesteps=decoder.diffusion.num_timesteps,
            variance_type="learned_range",
            prediction_type="epsilon",
            clip_sample=bool(decoder.sampling["clip_denoised"]),
            clip_sample_range=1.0,
        ),
        "super_res_scheduler": UnCLIPScheduler(
            num_train_timesteps=upsampler.diffusion.num_timesteps,
            variance_type="learned_range"
            if upsampler.diffusion.learned_variance
            else "fixed_small_log",
            prediction_type="epsilon",
            clip_sample=True,
            clip_sample_range=1.0,
        ),
    }


def _same_clip(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def build_pipeline(prior, decoder, upsampler, clip: torch.nn.Module | None = None) -> Any:
    """The UnCLIPPipeline of three loaded unclip stages (in memory)."""
    from diffusers import UnCLIPPipeline

    prior_clip = prior.net.caption_encoder.clip_model
    clip = clip or prior_clip
    _require(
        clip is not None, "the prior reads captions with no CLIP (model.text_encoder.mode=clip)"
    )
    for name, stage_clip in (
        ("prior", prior_clip),
        ("decoder", decoder.net.text.clip_model if decoder.net.text else None),
    ):
        _require(
            stage_clip is not None and _same_clip(stage_clip, clip),
            f"the {name} reads captions with another CLIP than the exported text encoder",
        )
    _require(
        prior.embed_dim == decoder.embed_dim,
        f"prior embed_dim {prior.embed_dim} != decoder embed_dim {decoder.embed_dim}",
    )
    _require(
        upsampler.low_res_size == decoder.image_size,
        f"the upsampler takes {upsampler.low_res_size}px images, the decoder makes {decoder.image_size}px",
    )
    unet, text_proj = decoder_models(decoder)
    super_res = upsampler_model(upsampler)
    return UnCLIPPipeline(
        prior=prior_model(prior),
        decoder=unet,
        text_encoder=text_encoder(clip),
        tokenizer=tokenizer(clip.context_length),
        text_proj=text_proj,
        super_res_first=super_res,
        super_res_last=copy.deepcopy(super_res),
        **schedulers(prior, decoder, upsampler),
    )


def export(
    prior: str | Path,
    decoder: str | Path,
    upsampler: str | Path | None,
    out: str | Path,
    clip: str | None = None,
) -> Path:
    """Write the pipeline folder of three unclip checkpoints; `clip` overrides the prior's CLIP."""
    if upsampler is None:
        raise ValueError(
            "--upsampler is required: diffusers' UnCLIPPipeline always runs a super-resolution stage"
        )
    clip_model = None
    if clip:
        from unclip.clip import load_clip

        clip_model = load_clip(clip).model
    stages = [load_module(path) for path in (prior, decoder, upsampler)]
    kinds = ("DiffusionPriorModule", "DecoderModule", "UpsamplerModule")
    for path, stage, kind in zip((prior, decoder, upsampler), stages, kinds, strict=True):
        _require(
            type(stage).__name__ == kind, f"{path} holds a {type(stage).__name__}, not a {kind}"
        )
    with torch.no_grad():
        pipeline = build_pipeline(*stages, clip=clip_model)
    out = Path(out)
    pipeline.save_pretrained(out, safe_serialization=True)
    _fix_text_proj_entry(out)
    return out


def _fix_text_proj_entry(out: Path) -> None:
    """diffusers (0.42) records UnCLIPTextProjModel, which lives in the deprecated pipelines folder,
    as ["diffusers", ...], a name it then cannot load; its full module path loads (the module is
    imported with UnCLIPPipeline itself)."""
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    library, name = index["text_proj"]
    if library == "diffusers" and name == "UnCLIPTextProjModel":
        index["text_proj"] = [text_proj_class().__module__, name]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
