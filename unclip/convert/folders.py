"""Reading diffusers folders (`save_pretrained` layout) and writing unclip checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from unclip.resources import conf_path
from unclip.training.module import CHECKPOINT_CLASS_KEY, UnclipModule

WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


def is_pipeline(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def read_config(folder: Path, name: str = "config.json") -> dict[str, Any]:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no diffusers config here (save_pretrained writes one)")
    return json.loads(path.read_text())


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A diffusers model folder's tensors (safetensors or a torch .bin, loaded without pickle)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{folder}: none of {', '.join(WEIGHT_FILES)} (sharded weights: not supported)"
    )


def read_model(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return read_config(folder), read_weights(folder)


def scheduler_config(pipeline: Path | None, name: str) -> dict[str, Any]:
    """`<pipeline>/<name>/scheduler_config.json`, or {} without a pipeline folder."""
    if pipeline is None or not (pipeline / name / "scheduler_config.json").is_file():
        return {}
    return read_config(pipeline / name, "scheduler_config.json")


def model_config(name: str) -> dict[str, Any]:
    """A `conf/model/<name>.yaml` as a plain dict without `_target_` and `defaults`."""
    path = conf_path("model", f"{name}.yaml")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return {k: v for k, v in cfg.items() if k not in ("_target_", "defaults")}


def save_checkpoint(module: UnclipModule, path: str | Path) -> Path:
    """A checkpoint `load_module`, `sample.py` and `init_from` read like one Lightning wrote:
    state dict, hyperparameters and the stage's class (no optimiser state: nothing to resume)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": L.__version__,
        "global_step": 0,
        "epoch": 0,
        CHECKPOINT_CLASS_KEY: f"{type(module).__module__}.{type(module).__qualname__}",
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)
    return path
