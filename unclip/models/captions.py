"""The caption encoder of a stage, from its config block: the frozen CLIP of "clip" mode is
loaded here and handed to the network (unclip.nn never loads a model)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from unclip.clip import load_clip
from unclip.nn.caption_encoder import CaptionEncoder, CaptionEncoderConfig
from unclip.training.config_check import ConfigError, build_config


def build_caption_encoder(
    given: Mapping[str, Any] | CaptionEncoderConfig | None, where: str
) -> CaptionEncoder:
    config = build_config(CaptionEncoderConfig, given, where)
    if config.mode != "clip":
        return CaptionEncoder(config)
    if not config.clip:
        raise ConfigError(f"{where}.mode=clip needs a CLIP spec in {where}.clip")
    bundle = load_clip(config.clip)
    return CaptionEncoder(config, clip_model=bundle.model, tokenizer=bundle.tokenizer)
