"""Build and load CLIP models through open_clip, offline.

A CLIP "spec" is one of:
  - ``ViT-B-32:laion2b_s34b_b79k``  an open_clip name and pretrained tag (downloads; for users online),
  - ``ViT-B-32`` or ``unclip-tiny``   an architecture with random weights,
  - ``local-dir:/path``              a folder holding ``open_clip_config.json`` and weights,
  - ``/path/model.pt|.bin|.safetensors:ARCH``  a local open_clip checkpoint of architecture ARCH,
  - ``/path/run/checkpoints/last.ckpt`` a checkpoint of our ``model=clip`` stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from unclip.resources import conf_path

ARCH_DIR = conf_path("clip_arch")
STAGE_CLASS_KEY = "unclip_module"  # where an unclip checkpoint names its stage class

if ARCH_DIR.is_dir():
    open_clip.add_model_config(str(ARCH_DIR))


@dataclass
class ClipBundle:
    """Everything needed to embed with one CLIP; `info` is what the shard sidecar records."""

    model: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):  # allows `model, preprocess, tokenizer, info = load_clip(spec)`
        return iter((self.model, self.preprocess, self.tokenizer, self.info))


def register_arch(name: str, config: dict) -> None:
    """Register an architecture dict under `name` through open_clip's own config registry. A
    checkpoint's own architecture wins over a config file of the same name that has changed since."""
    if name in open_clip.list_models() and open_clip.get_model_config(name) == config:
        return
    folder = Path(tempfile.mkdtemp(prefix="unclip-arch-"))
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


@contextlib.contextmanager
def quiet_random_init():
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" warning where
    that is intended: a stage trained from scratch, or one whose weights are loaded right after."""

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _bundle(model: nn.Module, model_name: str, spec: str) -> ClipBundle:
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    preprocess = open_clip.image_transform(
        preprocess_cfg["size"],
        is_train=False,
        mean=preprocess_cfg.get("mean"),
        std=preprocess_cfg.get("std"),
        interpolation=preprocess_cfg.get("interpolation"),
        resize_mode=preprocess_cfg.get("resize_mode"),
    )
    tokenizer = open_clip.get_tokenizer(model_name)
    embed_dim = int(getattr(model, "embed_dim", 0) or model.text_projection.shape[-1])
    info = {"spec": spec, "model_name": model_name, "embed_dim": embed_dim}
    return ClipBundle(model.eval(), preprocess, tokenizer, info)


def load_clip(spec: str, device: str | torch.device = "cpu") -> ClipBundle:
    """Load a CLIP from any spec in this module's docstring; never downloads unless a pretrained tag
    is named."""
    path_part, _, arch = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if spec.endswith(".ckpt"):
        return _load_stage_checkpoint(Path(spec), device)
    if spec.startswith("local-dir:"):
        model = open_clip.create_model(spec, device=device)
        return _bundle(model, spec, spec)
    if path_part and Path(path_part).is_file():
        model = open_clip.create_model(arch, pretrained=path_part, device=device)
        return _bundle(model, arch, spec)
    if Path(spec).exists():
        raise ValueError(
            f"CLIP spec {spec!r} is a file but names no architecture: write it as '{spec}:ARCH' "
            f"(one of open_clip.list_models()), or pass a model=clip checkpoint ending in .ckpt"
        )
    name, _, tag = spec.partition(":")
    if name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP architecture {name!r} in spec {spec!r}")
    model = open_clip.create_model(name, pretrained=tag or None, device=device)
    return _bundle(model, name, spec)


def _load_stage_checkpoint(path: Path, device: str | torch.device) -> ClipBundle:
    """The open_clip model of a `model=clip` checkpoint (its EMA weights when it has them), read
    straight from the file: no Lightning, nothing downloaded."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    stage = str(checkpoint.get(STAGE_CLASS_KEY, "")).rpartition(".")[2]
    hparams = checkpoint.get("hyper_parameters", {})
    if stage != "ClipModule" or "model_name" not in hparams:
        raise ValueError(f"{path} is a {stage or 'non-unclip'} checkpoint, not a model=clip one")
    name = hparams["model_name"]
    if hparams.get("arch"):
        register_arch(name, hparams["arch"])
    with quiet_random_init():  # the weights are loaded next
        model = open_clip.create_model(name)
    state = checkpoint["state_dict"]
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "net."
    model.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return _bundle(model.to(device), name, str(path))


def clip_pixels(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Map our batch images ([-1, 1], any size) to what the CLIP image tower expects."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = (images + 1) / 2
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(cfg["mean"], device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(
    model: nn.Module,
    preprocess: Callable,
    images: list[Image.Image] | torch.Tensor,
    normalize: bool = True,
) -> torch.Tensor:
    """Float32 image embeddings from PIL images (via `preprocess`) or [-1, 1] tensors; L2-normalised
    unless `normalize=False` (the raw embeddings Karlo's prior statistics describe)."""
    device = _device_of(model)
    if isinstance(images, torch.Tensor):
        pixels = clip_pixels(images.to(device), model)
    else:
        pixels = torch.stack([preprocess(image.convert("RGB")) for image in images]).to(device)
    embeddings = model.encode_image(pixels).float()
    return F.normalize(embeddings, dim=-1) if normalize else embeddings


@torch.no_grad()
def encode_texts(
    model: nn.Module, tokenizer: Callable, captions: list[str], normalize: bool = True
) -> torch.Tensor:
    """Float32 caption embeddings, L2-normalised unless `normalize=False`."""
    tokens = tokenizer(captions).to(_device_of(model))
    embeddings = model.encode_text(tokens).float()
    return F.normalize(embeddings, dim=-1) if normalize else embeddings
