"""FSDP for every stage, EMA included.

Strategy: Lightning's `FSDPStrategy` (FSDP1 with `use_orig_params=True`), not `ModelParallelStrategy`
(FSDP2, `fully_shard`). ModelParallelStrategy makes each LightningModule shard itself in
`configure_model` (per-stage code, and a device mesh it builds for CUDA); FSDPStrategy takes the
wrap and activation-checkpointing policies from config (`wrap_classes`), writes and resumes both
full and sharded state dicts, and runs with gloo on CPU, which lets the tests train two sharded
ranks (tests/fsdp_cpu.py). Moving to FSDP2 later changes this file and conf/strategy/fsdp.yaml only.

How the pieces fit:
- wrap policy: the configured block classes, plus every module marked with `mark_unit`. The base
  module marks its network and the network's EMA copy, so the two become FSDP units of identical
  structure: each rank then holds matching shards of a weight and of its average, and the EMA
  update is an elementwise lerp of local shards, with no communication. (An EMA held outside the
  wrapped module would need the full weights gathered at every step and a full copy per rank.)
- gradient clipping: Lightning's FSDP precision refuses norm clipping; the base module clips
  through the root FSDP module's `clip_grad_norm_` (`clip_sharded_gradients`), which reduces the
  norm over all shards.
- validation and sample grids: `FullWeightsForEval` gathers the full weights
  (`summon_full_params`, read-only) for the whole validation run, so stage code that calls
  submodules outside `forward` sees real tensors, never flattened size-0 shards; meanwhile
  `UnclipFSDPStrategy` runs validation steps without the root module's forward (whose
  post-forward would reshard them).
- weight decay groups are decided on the shapes recorded before wrapping (shards are 1-D).
"""

from __future__ import annotations

import importlib
from contextlib import ExitStack
from typing import Any

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

UNIT_ATTR = "_unclip_fsdp_unit"


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


def mark_unit(module: nn.Module) -> None:
    """Make `module` its own FSDP unit (its copies too: the mark survives `deepcopy`)."""
    setattr(module, UNIT_ATTR, True)


class UnitPolicy:
    """torch's callable auto-wrap policy: wrap instances of `classes` and marked modules.
    A class rather than a lambda so spawned processes can unpickle it."""

    def __init__(self, classes: set[type[nn.Module]]) -> None:
        self.classes = tuple(classes)

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if recurse:
            return True
        return isinstance(module, self.classes) or bool(getattr(module, UNIT_ATTR, False))


def fsdp_strategy(
    wrap_classes: list[str],
    activation_checkpointing: bool = False,
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "full",
    strategy_class: type[FSDPStrategy] | None = None,
    **kwargs: Any,
) -> FSDPStrategy:
    """Lightning's FSDPStrategy wrapping our blocks (`wrap_classes`) and each stage's network and
    EMA copy; `state_dict_type` "full" writes one file from rank 0, "sharded" a folder per
    checkpoint (both resume, and sample.py loads both)."""
    classes = resolve_classes(wrap_classes)
    return (strategy_class or UnclipFSDPStrategy)(
        auto_wrap_policy=UnitPolicy(classes),
        activation_checkpointing_policy=classes if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        **kwargs,
    )


def fsdp_root(trainer: L.Trainer | None) -> nn.Module | None:
    """The root FSDP module of a trainer running FSDPStrategy, else None."""
    if trainer is None or not isinstance(trainer.strategy, FSDPStrategy):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = trainer.strategy.model
    return model if isinstance(model, FullyShardedDataParallel) else None


def clip_sharded_gradients(trainer: L.Trainer | None, max_norm: float) -> bool:
    """Clip by the global norm over all shards; False when not running FSDP."""
    root = fsdp_root(trainer)
    if root is None:
        return False
    root.clip_grad_norm_(max_norm)
    return True


class FullWeightsForEval(L.Callback):
    """Under FSDP, every rank holds the full (read-only) weights from the start to the end of each
    validation run: validation steps, sampling and the sample grid read real tensors, and FSDP
    units run as the plain modules they wrap. Costs a full copy of the module per rank while
    validating; training memory is unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self._stack: ExitStack | None = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        root = fsdp_root(trainer)
        if root is None:
            return
        from torch.distributed.fsdp import FullyShardedDataParallel

        self._stack = ExitStack()
        self._stack.enter_context(
            FullyShardedDataParallel.summon_full_params(root, writeback=False, recurse=True)
        )
        # a unit's own forward would reshard it on the way out: call the wrapped modules directly
        units = FullyShardedDataParallel.fsdp_modules(root)
        for unit in units:
            unit.forward = unit._fsdp_wrapped_module.forward
        self._stack.callback(lambda: [vars(unit).pop("forward", None) for unit in units])
        trainer.strategy.full_weights = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before ModelCheckpoint's on_validation_end (Lightning runs checkpoint callbacks last)
        if self._stack is not None:
            trainer.strategy.full_weights = False
            self._stack.close()
            self._stack = None


class UnclipFSDPStrategy(FSDPStrategy):
    """FSDPStrategy whose validation steps, while `FullWeightsForEval` holds the full weights, call
    the LightningModule directly: through the root FSDP module's forward, as Lightning does, its
    post-forward would reshard the weights summoned for validation."""

    full_weights = False

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.full_weights:
            return self.lightning_module.validation_step(*args, **kwargs)
        return super().validation_step(*args, **kwargs)
