"""diffusers / Karlo weights -> unclip checkpoints.

Each stage starts from its `conf/model/*_karlo.yaml` (the one place its settings live), takes the
shapes from the diffusers config, builds the unclip module, fills its network through the link
table of `networks.py` (EMA copy included) and saves a checkpoint that `load_module`, `sample.py`
and `train.py ... init_from=CKPT` read.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unclip.convert.folders import (
    is_pipeline,
    model_config,
    read_config,
    read_model,
    save_checkpoint,
    scheduler_config,
)
from unclip.convert.links import to_ours
from unclip.convert.networks import (
    decoder_extra_keys,
    decoder_links,
    prior_extra_keys,
    prior_links,
    unet_links,
)
from unclip.training.module import UnclipModule

log = logging.getLogger(__name__)

STAGES = ("prior", "decoder", "upsampler")
PRIOR_STATISTICS = ("clip_mean", "clip_std")
# the folder of each stage inside a saved UnCLIPPipeline
PIPELINE_FOLDERS = {"prior": "prior", "decoder": "decoder", "upsampler": "super_res_first"}
SCHEDULER_FOLDERS = {
    "prior": "prior_scheduler",
    "decoder": "decoder_scheduler",
    "upsampler": "super_res_scheduler",
}


def _expect(config: dict, where: str, **expected: Any) -> None:
    """diffusers options unclip's networks do not implement: refuse rather than convert wrongly."""
    for key, want in expected.items():
        have = config.get(key, want)
        if have != want:
            raise ValueError(f"{where}: {key}={have!r} is not supported (unclip needs {want!r})")


def _text_encoder(clip: str | None, width: int, context_length: int) -> dict[str, Any]:
    if clip:
        return {"mode": "clip", "clip": clip}
    log.warning(
        "no --clip given: the converted stage reads captions with an untrained 1-layer text "
        "encoder of width %d (only useful for tests); pass the CLIP the model was trained with",
        width,
    )
    return {
        "mode": "own",
        "width": width,
        "context_length": context_length,
        "layers": 1,
        "heads": 1,
    }


# ---- hyperparameters from diffusers configs --------------------------------------------------------
def prior_hparams(config: dict, scheduler: dict, clip: str | None) -> dict[str, Any]:
    where = "PriorTransformer config"
    _expect(
        config,
        where,
        norm_in_type=None,
        embedding_proj_norm_type=None,
        encoder_hid_proj_type="linear",
        added_emb_type="prd",
        additional_embeddings=4,
        time_embed_act_fn="silu",
    )
    width = config["num_attention_heads"] * config["attention_head_dim"]
    dim = config["embedding_dim"]
    for key in ("time_embed_dim", "embedding_proj_dim", "clip_embed_dim"):
        if config.get(key) not in (None, width if key == "time_embed_dim" else dim):
            raise ValueError(f"{where}: {key}={config[key]} is not supported")
    hp = model_config("prior_diffusion_karlo")
    hp["embed_dim"] = dim
    hp["net"].update(
        width=width,
        layers=config["num_layers"],
        heads=config["num_attention_heads"],
        dropout=config.get("dropout", 0.0),
    )
    hp["text_encoder"] = {
        **hp["text_encoder"],
        **_text_encoder(clip, dim, config["num_embeddings"]),
    }
    if not clip:
        hp["null_condition"] = "learned"
    if scheduler:
        _expect(scheduler, "prior scheduler", prediction_type="sample")
        hp["diffusion"]["num_timesteps"] = scheduler.get("num_train_timesteps", 1000)
        clip_sample = scheduler.get("clip_sample", True)
        hp["sampling"]["clip_x0"] = scheduler.get("clip_sample_range", 1.0) if clip_sample else None
    return hp


def _unet_shape(config: dict, where: str) -> dict[str, Any]:
    """The UNet arguments shared by the decoder and the upsampler, from a diffusers UNet config."""
    _expect(
        config,
        where,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=32,
        norm_eps=1e-5,
        mid_block_scale_factor=1,
        center_input_sample=False,
        time_embedding_type="positional",
    )
    channels = list(config["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels) or any(c % 32 for c in channels):
        raise ValueError(
            f"{where}: block_out_channels {channels} are not multiples of the first and of 32"
        )
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ValueError(f"{where}: resnet_time_scale_shift={shift!r} is not supported")
    return {
        "model_channels": base,
        "channel_mult": [c // base for c in channels],
        "num_res_blocks": config["layers_per_block"],
        "use_scale_shift_norm": shift == "scale_shift",
        "resblock_updown": True,
        "dropout": 0.0,
    }


def decoder_hparams(config: dict, text_proj: dict, scheduler: dict, clip: str | None) -> dict:
    where = "decoder UNet2DConditionModel config"
    _expect(
        config,
        where,
        class_embed_type="identity",
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        only_cross_attention=False,
        cross_attention_norm=None,
        addition_embed_type=None,
        encoder_hid_dim=None,
        time_embedding_dim=None,
        time_cond_proj_dim=None,
        timestep_post_act=None,
        resnet_skip_time_act=False,
        resnet_out_scale_factor=1.0,
        conv_in_kernel=3,
        conv_out_kernel=3,
        mid_block_only_cross_attention=None,
    )
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    attention = {"SimpleCrossAttnDownBlock2D": True, "ResnetDownsampleBlock2D": False}
    up_kinds = {"SimpleCrossAttnUpBlock2D": True, "ResnetUpsampleBlock2D": False}
    for kind in down:
        if kind not in attention:
            raise ValueError(f"{where}: down block {kind!r} is not supported")
    for kind in up:
        if kind not in up_kinds:
            raise ValueError(f"{where}: up block {kind!r} is not supported")
    if [attention[k] for k in down] != [up_kinds[k] for k in reversed(up)]:
        raise ValueError(f"{where}: attention at different levels going down {down} and up {up}")
    size = config["sample_size"]
    unet = _unet_shape(config, where)
    unet["attention_resolutions"] = [
        size // 2**i for i, a in enumerate(attention[k] for k in down) if a
    ]
    head = config["attention_head_dim"]
    unet["num_head_channels"] = head[0] if isinstance(head, list) else head
    dim = text_proj["clip_embeddings_dim"]
    hp = model_config("decoder_karlo")
    hp.update(embed_dim=dim, image_size=size)
    hp["net"]["unet"].update(unet)
    hp["net"].update(
        num_image_tokens=text_proj["clip_extra_context_tokens"],
        context_dim=text_proj["cross_attention_dim"],
    )
    text = _text_encoder(clip, dim, 77)
    hp["net"]["text"] = {**text, "pooled": "projected"} if clip else text
    in_channels = config.get("in_channels", 3)
    hp["diffusion"]["learned_variance"] = config.get("out_channels", 3) == 2 * in_channels
    if scheduler:
        _expect(scheduler, "decoder scheduler", prediction_type="epsilon")
        hp["diffusion"]["num_timesteps"] = scheduler.get("num_train_timesteps", 1000)
    return hp


def upsampler_hparams(config: dict, scheduler: dict, low_res_size: int | None) -> dict:
    where = "upsampler UNet2DModel config"
    for kind in config["down_block_types"]:
        if kind != "ResnetDownsampleBlock2D":
            raise ValueError(f"{where}: down block {kind!r} is not supported (no attention)")
    for kind in config["up_block_types"]:
        if kind != "ResnetUpsampleBlock2D":
            raise ValueError(f"{where}: up block {kind!r} is not supported (no attention)")
    _expect(config, where, add_attention=False, in_channels=6, class_embed_type=None)
    size = config["sample_size"]
    hp = model_config("upsampler_256_karlo")
    hp.update(image_size=size, low_res_size=low_res_size or size // 4)
    hp["unet"].update(_unet_shape(config, where))
    hp["diffusion"]["learned_variance"] = config.get("out_channels", 3) == 6
    if scheduler:
        _expect(scheduler, "super-res scheduler", prediction_type="epsilon")
        hp["diffusion"]["num_timesteps"] = scheduler.get("num_train_timesteps", 1000)
    return hp


# ---- filling the networks ----------------------------------------------------------------------
def load_linked(net: nn.Module, links: list, theirs: dict, extra: list[str]) -> None:
    """Fill `net` from diffusers tensors; `extra` keys (no counterpart) keep their values."""
    state = net.state_dict()
    linked = to_ours(links, theirs, {k: v for k, v in state.items() if k not in extra})
    net.load_state_dict({**state, **linked})


def _finish(module: UnclipModule) -> UnclipModule:
    """The EMA copy starts equal to the converted weights."""
    if module.ema is not None:
        module.ema.module.load_state_dict(copy.deepcopy(module.net.state_dict()))
    return module.eval()


def prior_module(config: dict, weights: dict, scheduler: dict, clip: str | None) -> UnclipModule:
    from unclip.models.diffusion_prior import DiffusionPriorModule

    module = DiffusionPriorModule(**prior_hparams(config, scheduler, clip))
    net = module.net
    if net.context_length != config["num_embeddings"]:
        raise ValueError(
            f"the prior attends over {config['num_embeddings']} caption tokens but the CLIP "
            f"{clip!r} has context_length {net.context_length}"
        )
    # clip_mean / clip_std are the module's standardisation, not the network's
    network = {k: v for k, v in weights.items() if k not in PRIOR_STATISTICS}
    load_linked(net, prior_links(net), network, prior_extra_keys(net))
    norm = module.embedding_norm
    norm.mean.copy_(weights["clip_mean"].reshape(-1))
    norm.std.copy_(weights["clip_std"].reshape(-1))
    norm.fitted.fill_(True)
    return _finish(module)


def decoder_module(
    config: dict,
    weights: dict,
    text_proj: dict,
    text_weights: dict,
    scheduler: dict,
    clip: str | None,
) -> UnclipModule:
    from unclip.models.decoder import DecoderModule

    module = DecoderModule(**decoder_hparams(config, text_proj, scheduler, clip))
    theirs = {f"decoder.{k}": v for k, v in weights.items()}
    theirs.update({f"text_proj.{k}": v for k, v in text_weights.items()})
    net = module.net
    load_linked(net, decoder_links(net), theirs, decoder_extra_keys(net))
    return _finish(module)


def upsampler_module(
    config: dict, weights: dict, scheduler: dict, low_res_size: int | None
) -> UnclipModule:
    from unclip.models.upsampler import UpsamplerModule

    module = UpsamplerModule(**upsampler_hparams(config, scheduler, low_res_size))
    load_linked(module.net, unet_links(module.net), weights, [])
    return _finish(module)


def convert(
    source: str | Path,
    stage: str,
    out: str | Path,
    clip: str | None = None,
    text_proj: str | Path | None = None,
    low_res_size: int | None = None,
) -> Path:
    """Convert one stage of a diffusers model folder or UnCLIPPipeline folder; returns `out`."""
    if stage not in STAGES:
        raise ValueError(f"--stage {stage!r}: choose one of {STAGES}")
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: not a diffusers folder")
    pipeline = source if is_pipeline(source) else None
    folder = source / PIPELINE_FOLDERS[stage] if pipeline else source
    scheduler = scheduler_config(pipeline, SCHEDULER_FOLDERS[stage])
    config, weights = read_model(folder)
    with torch.no_grad():
        if stage == "prior":
            module = prior_module(config, weights, scheduler, clip)
        elif stage == "decoder":
            proj_folder = source / "text_proj" if pipeline else text_proj
            if proj_folder is None:
                raise ValueError(
                    "--stage decoder from a model folder needs --text-proj DIR (the "
                    "UnCLIPTextProjModel folder); a pipeline folder has it in text_proj/"
                )
            proj_config, proj_weights = read_model(Path(proj_folder))
            module = decoder_module(config, weights, proj_config, proj_weights, scheduler, clip)
        else:
            if low_res_size is None and pipeline is not None:
                # the pipeline feeds its super-resolution stage the decoder's images
                low_res_size = read_config(pipeline / "decoder")["sample_size"]
            module = upsampler_module(config, weights, scheduler, low_res_size)
    return save_checkpoint(module, out)
