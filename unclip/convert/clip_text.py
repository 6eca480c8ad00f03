"""open_clip's text tower -> transformers' CLIPTextModelWithProjection + CLIPTokenizer, the text
encoder diffusers' UnCLIPPipeline runs. Both compute the same pre-LayerNorm causal transformer; the
tokenizer is rebuilt from open_clip's own BPE vocabulary, so the ids of a caption agree up to its
end-of-text token; it pads with end-of-text (open_clip with 0), which changes only the states of
padding positions, and those the prior and the decoder mask out."""

from __future__ import annotations

from typing import Any

import open_clip
import torch
from open_clip.transformer import QuickGELU
from torch import nn

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# open_clip's names of the same two special tokens
OPENCLIP_SPECIAL = {"<start_of_text>": BOS, "<end_of_text>": EOS}


def _check_text_tower(clip: nn.Module) -> None:
    if not hasattr(clip, "token_embedding"):
        raise ValueError(f"{type(clip).__name__} has no open_clip built-in text tower to export")
    if getattr(clip, "text_pool_type", "argmax") != "argmax":
        raise ValueError(f"text pooling {clip.text_pool_type!r} is not CLIP's EOT pooling")
    if clip.attn_mask is None:
        raise ValueError(
            "the CLIP text tower has no causal mask; transformers' CLIP always has one"
        )
    block = clip.transformer.resblocks[0]
    if not isinstance(block.ls_1, nn.Identity) or hasattr(block, "ln_1_kv"):
        raise ValueError("layer scale / cross attention in the CLIP text tower is not supported")
    projection = clip.text_projection
    if isinstance(projection, nn.Linear) and projection.bias is not None:
        raise ValueError(
            "a text projection with a bias is not supported by CLIPTextModelWithProjection"
        )


def text_config(clip: nn.Module) -> dict[str, Any]:
    """CLIPTextConfig arguments of an open_clip text tower."""
    _check_text_tower(clip)
    block = clip.transformer.resblocks[0]
    projection = clip.text_projection
    out_dim = projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]
    return {
        "vocab_size": int(clip.token_embedding.num_embeddings),
        "hidden_size": int(clip.transformer.width),
        "intermediate_size": int(block.mlp.c_fc.out_features),
        "num_hidden_layers": len(clip.transformer.resblocks),
        "num_attention_heads": int(block.attn.num_heads),
        "max_position_embeddings": int(clip.context_length),
        "hidden_act": "quick_gelu" if isinstance(block.mlp.gelu, QuickGELU) else "gelu",
        "projection_dim": int(out_dim),
        "layer_norm_eps": float(block.ln_1.eps),
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


def text_state_dict(clip: nn.Module) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection's tensors from an open_clip model's text tower."""
    prefix = "text_model."
    out = {
        f"{prefix}embeddings.token_embedding.weight": clip.token_embedding.weight,
        f"{prefix}embeddings.position_embedding.weight": clip.positional_embedding,
        f"{prefix}final_layer_norm.weight": clip.ln_final.weight,
        f"{prefix}final_layer_norm.bias": clip.ln_final.bias,
    }
    for i, block in enumerate(clip.transformer.resblocks):
        layer = f"{prefix}encoder.layers.{i}."
        q, k, v = block.attn.in_proj_weight.chunk(3)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3)
        out.update(
            {
                f"{layer}self_attn.q_proj.weight": q,
                f"{layer}self_attn.q_proj.bias": qb,
                f"{layer}self_attn.k_proj.weight": k,
                f"{layer}self_attn.k_proj.bias": kb,
                f"{layer}self_attn.v_proj.weight": v,
                f"{layer}self_attn.v_proj.bias": vb,
                f"{layer}self_attn.out_proj.weight": block.attn.out_proj.weight,
                f"{layer}self_attn.out_proj.bias": block.attn.out_proj.bias,
                f"{layer}layer_norm1.weight": block.ln_1.weight,
                f"{layer}layer_norm1.bias": block.ln_1.bias,
                f"{layer}layer_norm2.weight": block.ln_2.weight,
                f"{layer}layer_norm2.bias": block.ln_2.bias,
                f"{layer}mlp.fc1.weight": block.mlp.c_fc.weight,
                f"{layer}mlp.fc1.bias": block.mlp.c_fc.bias,
                f"{layer}mlp.fc2.weight": block.mlp.c_proj.weight,
                f"{layer}mlp.fc2.bias": block.mlp.c_proj.bias,
            }
        )
    projection = clip.text_projection
    out["text_projection.weight"] = (
        projection.weight if isinstance(projection, nn.Linear) else projection.t()
    )
    return {key: value.detach().float().contiguous().clone() for key, value in out.items()}


def text_encoder(clip: nn.Module) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(CLIPTextConfig(**text_config(clip)))
    missing, unexpected = model.load_state_dict(text_state_dict(clip), strict=False)
    # position_ids is a buffer transformers fills itself
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"CLIP text export: missing {missing}, unexpected {unexpected}")
    return model.eval()


def tokenizer(context_length: int) -> Any:
    """A CLIPTokenizer with open_clip's BPE vocabulary and merges."""
    from transformers import CLIPTokenizer

    bpe = open_clip.SimpleTokenizer()
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    return CLIPTokenizer(
        vocab={OPENCLIP_SPECIAL.get(token, token): i for token, i in bpe.encoder.items()},
        merges=[tuple(pair) for pair in merges],
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=int(context_length),
    )
