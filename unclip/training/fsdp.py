"""FSDP strategy from YAML: wrap and checkpointing policies are sets of classes, named in config."""

from __future__ import annotations

import importlib

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


def resolve_classes(paths: list[str]) -> set[type[nn.Module]]:
    """Import `package.module.ClassName` strings; an unknown name fails naming the config value."""
    classes = set()
    for path in paths:
        module_name, _, class_name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(f"strategy: cannot import module class {path!r}: {error}") from error
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"strategy: {path!r} is not an nn.Module class")
        classes.add(cls)
    return classes


def fsdp_strategy(
    wrap_classes: list[str],
    activation_checkpointing: bool = False,
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "full",
    **kwargs,
) -> FSDPStrategy:
    """Lightning's FSDPStrategy with its auto-wrap policy on our transformer/residual blocks."""
    classes = resolve_classes(wrap_classes)
    return FSDPStrategy(
        auto_wrap_policy=classes,
        activation_checkpointing_policy=classes if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        **kwargs,
    )
