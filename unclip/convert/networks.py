"""The link tables (see links.py) of the three networks Karlo / diffusers and unclip share:
PriorTransformer <-> DiffusionPriorNet, UNet2DConditionModel + UnCLIPTextProjModel <-> DecoderNet,
UNet2DModel <-> the upsampler's UNet. Keys on the diffusers side of the decoder carry the model's
folder name ("decoder." / "text_proj.")."""

from __future__ import annotations

from torch import nn

from unclip.convert.links import Link, module_links
from unclip.nn.decoder_net import DecoderNet
from unclip.nn.diffusion_prior_net import DiffusionPriorNet
from unclip.nn.unet import AttentionBlock, Downsample, ResBlock, UNet, Upsample


def prior_links(net: DiffusionPriorNet) -> list[Link]:
    """DiffusionPriorNet keys <- PriorTransformer keys (its learned nulls and own caption encoder,
    which Karlo has no counterpart of, are left out: see `prior_extra_keys`)."""
    links = [
        *module_links("x_proj", "proj_in"),
        *module_links("text_emb_proj", "embedding_proj"),
        *module_links("caption_proj", "encoder_hidden_states_proj"),
        *module_links("time_embed.mlp.0", "time_embedding.linear_1"),
        *module_links("time_embed.mlp.2", "time_embedding.linear_2"),
        *module_links("ln_out", "norm_out"),
        *module_links("out", "proj_to_clip_embeddings"),
        Link("query", ("prd_embedding",)),
        Link("positional_embedding", ("positional_embedding",)),
    ]
    for i in range(len(net.transformer.blocks)):
        ours, theirs = f"transformer.blocks.{i}", f"transformer_blocks.{i}"
        links += [
            *module_links(f"{ours}.ln_attn", f"{theirs}.norm1"),
            *module_links(f"{ours}.attn.qkv", [f"{theirs}.attn1.to_{x}" for x in "qkv"]),
            *module_links(f"{ours}.attn.proj", f"{theirs}.attn1.to_out.0"),
            *module_links(f"{ours}.ln_mlp", f"{theirs}.norm3"),
            *module_links(f"{ours}.mlp.net.0", f"{theirs}.ff.net.0.proj"),
            *module_links(f"{ours}.mlp.net.2", f"{theirs}.ff.net.2"),
        ]
    return links


def prior_extra_keys(net: DiffusionPriorNet) -> list[str]:
    """unclip prior tensors with no diffusers counterpart: kept as initialised on import."""
    return [
        key
        for key in net.state_dict()
        if key in ("null_caption", "null_text_emb") or key.startswith("caption_encoder.")
    ]


def _res_links(ours: str, theirs: str, block: ResBlock) -> list[Link]:
    links = [
        *module_links(f"{ours}.in_norm", f"{theirs}.norm1"),
        *module_links(f"{ours}.in_conv", f"{theirs}.conv1"),
        *module_links(f"{ours}.emb_proj", f"{theirs}.time_emb_proj"),
        *module_links(f"{ours}.out_norm", f"{theirs}.norm2"),
        *module_links(f"{ours}.out_conv", f"{theirs}.conv2"),
    ]
    if isinstance(block.skip, nn.Conv2d):
        links += module_links(f"{ours}.skip", f"{theirs}.conv_shortcut")
    return links


def _attention_links(ours: str, theirs: str, block: AttentionBlock) -> list[Link]:
    links = [
        *module_links(f"{ours}.norm", f"{theirs}.group_norm"),
        *module_links(f"{ours}.qkv", [f"{theirs}.to_{x}" for x in "qkv"]),
        *module_links(f"{ours}.proj_out", f"{theirs}.to_out.0"),
    ]
    if block.context_kv is not None:
        links += module_links(
            f"{ours}.context_kv", [f"{theirs}.add_k_proj", f"{theirs}.add_v_proj"]
        )
    return links


def _block_links(ours: str, theirs: str, index: int, layers: nn.Module) -> tuple[list[Link], bool]:
    """Links of one EmbedSequential as diffusers' resnets[index] / attentions[index] /
    resamplers; also whether it ends in a resampling ResBlock (the end of a level)."""
    links: list[Link] = []
    resampled = False
    for position, layer in enumerate(layers):
        here = f"{ours}.{position}"
        if isinstance(layer, (Downsample, Upsample)):
            raise ValueError(
                "diffusers' UNet blocks resample inside a ResBlock: convert a UNet built with "
                "resblock_updown=true"
            )
        if isinstance(layer, ResBlock) and not isinstance(layer.resample, nn.Identity):
            kind = "downsamplers" if isinstance(layer.resample, Downsample) else "upsamplers"
            links += _res_links(here, f"{theirs}.{kind}.0", layer)
            resampled = True
        elif isinstance(layer, ResBlock):
            links += _res_links(here, f"{theirs}.resnets.{index}", layer)
        elif isinstance(layer, AttentionBlock):
            links += _attention_links(here, f"{theirs}.attentions.{index}", layer)
        else:
            raise ValueError(f"no diffusers counterpart for {type(layer).__name__} at {here}")
    return links, resampled


def unet_links(unet: UNet, ours: str = "", theirs: str = "") -> list[Link]:
    """UNet keys (prefixed `ours`) <- UNet2DModel / UNet2DConditionModel keys (prefixed `theirs`)."""
    links = [
        *module_links(f"{ours}input_blocks.0.0", f"{theirs}conv_in"),
        *module_links(f"{ours}time_embed.0", f"{theirs}time_embedding.linear_1"),
        *module_links(f"{ours}time_embed.2", f"{theirs}time_embedding.linear_2"),
        *module_links(f"{ours}out.0", f"{theirs}conv_norm_out"),
        *module_links(f"{ours}out.2", f"{theirs}conv_out"),
    ]
    level, index = 0, 0
    for number, block in enumerate(unet.input_blocks):
        if number == 0:
            continue
        block_links, resampled = _block_links(
            f"{ours}input_blocks.{number}", f"{theirs}down_blocks.{level}", index, block
        )
        links += block_links
        level, index = (level + 1, 0) if resampled else (level, index + 1)
    middle = list(unet.middle_block)
    attention = next((layer for layer in middle if isinstance(layer, AttentionBlock)), None)
    resnets = [i for i, layer in enumerate(middle) if isinstance(layer, ResBlock)]
    for j, position in enumerate(resnets):
        links += _res_links(
            f"{ours}middle_block.{position}", f"{theirs}mid_block.resnets.{j}", middle[position]
        )
    if attention is not None:
        links += _attention_links(
            f"{ours}middle_block.{middle.index(attention)}",
            f"{theirs}mid_block.attentions.0",
            attention,
        )
    level, index = 0, 0
    for number, block in enumerate(unet.output_blocks):
        block_links, resampled = _block_links(
            f"{ours}output_blocks.{number}", f"{theirs}up_blocks.{level}", index, block
        )
        links += block_links
        level, index = (level + 1, 0) if resampled else (level, index + 1)
    return links


def decoder_links(net: DecoderNet) -> list[Link]:
    """DecoderNet keys <- "decoder." (UNet2DConditionModel) and "text_proj."
    (UnCLIPTextProjModel) keys. Needs the Karlo-style decoder: CLIP caption states projected and
    LayerNormed (text_proj_norm), the projected CLIP text embedding as pooled input, a learned
    null image embedding."""
    if net.text is None or net.text_norm is None or not net.add_pooled_text:
        raise ValueError(
            "diffusers' UnCLIP decoder needs model.net.text (captions), add_pooled_text=true and "
            "text_proj_norm=true"
        )
    if not isinstance(net.null_image, nn.Parameter):
        raise ValueError("diffusers' UnCLIP decoder needs model.net.null_image_embedding=learned")
    tp = "text_proj."
    return [
        *unet_links(net.unet, "unet.", "decoder."),
        Link("null_image", (f"{tp}learned_classifier_free_guidance_embeddings",)),
        Link(
            "image_tokens.weight",
            (f"{tp}clip_extra_context_tokens_proj.weight",),
            "tokens",
            net.num_image_tokens,
        ),
        Link(
            "image_tokens.bias",
            (f"{tp}clip_extra_context_tokens_proj.bias",),
            "tokens",
            net.num_image_tokens,
        ),
        *module_links("text_proj", f"{tp}encoder_hidden_states_proj"),
        *module_links("text_norm", f"{tp}text_encoder_hidden_states_norm"),
        # unclip's cond_proj reads [z_i, pooled]: one Linear equal to the sum of diffusers' two
        Link(
            "unet.cond_proj.weight",
            (
                f"{tp}clip_image_embeddings_project_to_time_embeddings.weight",
                f"{tp}embedding_proj.weight",
            ),
            "cat_in",
        ),
        Link(
            "unet.cond_proj.bias",
            (
                f"{tp}clip_image_embeddings_project_to_time_embeddings.bias",
                f"{tp}embedding_proj.bias",
            ),
            "sum_bias",
        ),
    ]


def decoder_extra_keys(net: DecoderNet) -> list[str]:
    """DecoderNet tensors with no diffusers counterpart (an own caption encoder's)."""
    return [key for key in net.state_dict() if key.startswith("text.")]
