"""open_clip glue: build or load a CLIP, encode images and captions, read per-token text states."""

from unclip.clip.factory import (
    ARCH_DIR,
    ClipBundle,
    clip_pixels,
    encode_images,
    encode_texts,
    load_clip,
    register_arch,
)
from unclip.nn.caption_encoder import token_states

__all__ = [
    "ARCH_DIR",
    "ClipBundle",
    "clip_pixels",
    "encode_images",
    "encode_texts",
    "load_clip",
    "register_arch",
    "token_states",
]
